{{/* Names, labels and the pieces every template shares. */}}

{{- define "zit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* At most 40 characters: KubeRay refuses RayService names over 47 and appends suffixes to what it creates. */}}
{{- define "zit.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "zit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zit.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "zit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "zit.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "zit.authSecretName" -}}
{{- default (printf "%s-ray-auth" (include "zit.fullname" .)) .Values.ray.auth.existingSecret -}}
{{- end -}}

{{- define "zit.serveServiceName" -}}
{{- printf "%s-serve" (include "zit.fullname" .) -}}
{{- end -}}

{{- define "zit.modelsClaimName" -}}
{{- default (printf "%s-models" (include "zit.fullname" .)) .Values.models.existingClaim -}}
{{- end -}}

{{/* The folder of the weights inside the pods. */}}
{{- define "zit.modelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.models.mountPath) (trimPrefix "/" .Values.models.subPath) -}}
{{- end -}}

{{/* The file whose presence says the weights are complete (the download job writes the marker last). */}}
{{- define "zit.weightsReadyFile" -}}
{{- if .Values.models.download.enabled -}}
{{- printf "%s/.zit-download-complete" (include "zit.modelDir" .) -}}
{{- else -}}
{{- printf "%s/model_index.json" (include "zit.modelDir" .) -}}
{{- end -}}
{{- end -}}

{{/* Is there a weights volume at all? ('tiny' needs none.) */}}
{{- define "zit.usesWeights" -}}
{{- if ne (toString .Values.service.model) "tiny" -}}true{{- end -}}
{{- end -}}

{{/* The weights volume (name "models"): a raw volume source, an existing claim, or the chart's claim. */}}
{{- define "zit.modelsVolume" -}}
- name: models
{{- if .Values.models.volume }}
{{ toYaml .Values.models.volume | indent 2 }}
{{- else if or .Values.models.existingClaim .Values.models.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "zit.modelsClaimName" . }}
{{- else }}
{{- fail "models: the weights need a volume: set models.volume, models.existingClaim or models.persistence.enabled (or service.model: tiny for a smoke test)" }}
{{- end }}
{{- end -}}

{{/* Port of Ray's own Prometheus metrics on every Ray pod (`metrics-export-port`; KubeRay's default, port name
`metrics`), scraped by the optional PodMonitor. */}}
{{- define "zit.rayMetricsPort" -}}8080{{- end -}}

{{/* Where the head mounts the API key Secret (apiKeys), and the key file in it. */}}
{{- define "zit.apiKeysDir" -}}/etc/zit/api-keys{{- end -}}
{{- define "zit.apiKeysFile" -}}
{{- printf "%s/%s" (include "zit.apiKeysDir" .) (include "zit.apiKeysSecretKey" .) -}}
{{- end -}}
{{- define "zit.apiKeysSecretKey" -}}
{{- default "api-keys" .Values.apiKeys.secretKey -}}
{{- end -}}

{{/* Environment every Ray container shares: token auth (the same variables KubeRay injects, so it adds none). */}}
{{- define "zit.rayEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "zit.authSecretName" . }}
      key: auth_token
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end -}}

{{/*
Enabled GPU classes, smallest VRAM first (a map ranges alphabetically: vram_12 before vram_4), as a JSON list.
*/}}
{{- define "zit.enabledTiers" -}}
{{- $keys := list -}}
{{- range $name, $group := .Values.workerGroups -}}
{{- if not $group.disabled -}}
{{- $keys = append $keys (printf "%04d:%s" (int (trimPrefix "vram_" $name)) $name) -}}
{{- end -}}
{{- end -}}
{{- $names := list -}}
{{- range sortAlpha $keys -}}
{{- $names = append $names (last (splitList ":" .)) -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* Is the Serve application autoscaled (`service.autoscaling` set, even to {})? "true" or "". */}}
{{- define "zit.autoscaled" -}}
{{- if not (kindIs "invalid" .Values.service.autoscaling) -}}true{{- end -}}
{{- end -}}

{{/* A worker group's Kubernetes-friendly name: vram_12 -> vram-12 (pod names allow no underscore). */}}
{{- define "zit.groupName" -}}
{{- replace "_" "-" . -}}
{{- end -}}

{{/*
One Serve tier (deployments/config.py TierConfig) per enabled GPU class. The chart owns what ties the tier to its
worker group (device, num_gpus, the vram_<tier> resource, bf16, memory budget); `tier` adds the rest.
*/}}
{{- define "zit.tiers" -}}
{{- $root := .root -}}
{{- $autoscaled := include "zit.autoscaled" $root -}}
{{- $tiers := list -}}
{{- range $name := fromJsonArray (include "zit.enabledTiers" $root) -}}
{{- $group := index $root.Values.workerGroups $name -}}
{{- $tierValues := default dict $group.tier -}}
{{- $slots := int (default 1 $group.slots) -}}
{{- /* The pods the group can have: up to maxReplicas with KubeRay's autoscaler, else exactly minReplicas. */ -}}
{{- $podsKey := "maxReplicas" -}}
{{- $pods := int $group.maxReplicas -}}
{{- if not $root.Values.autoscaler.enabled -}}
{{- $podsKey = "minReplicas (autoscaler.enabled is false: KubeRay runs exactly that many pods)" -}}
{{- $pods = int $group.minReplicas -}}
{{- end -}}
{{- $cards := mul $pods $slots -}}
{{- if lt $cards 1 -}}
{{- fail (printf "workerGroups.%s: %s is %d, so the group has no pod for the tier's replicas; raise it, or set disabled: true" $name $podsKey $pods) -}}
{{- end -}}
{{- /* Replicas: the number given; else, autoscaled, every card (slot) the group can have, which is the policy's
`cards` and Serve's max_replicas, so the policy can ask for every pod KubeRay may start and for no more; else 1. */ -}}
{{- $given := and (hasKey $tierValues "num_replicas") (not (kindIs "invalid" $tierValues.num_replicas)) -}}
{{- $replicas := 1 -}}
{{- if $given -}}
{{- $replicas = int $tierValues.num_replicas -}}
{{- else if $autoscaled -}}
{{- $replicas = $cards -}}
{{- end -}}
{{- if gt $replicas $cards -}}
{{- fail (printf "workerGroups.%s: tier.num_replicas (%d) is more than %s (%d) x slots (%d); each replica needs a card (or a slot) of its own, so raise %s or lower num_replicas" $name $replicas $podsKey $pods $slots (first (splitList " " $podsKey))) -}}
{{- end -}}
{{- if and $autoscaled (ne $replicas $cards) -}}
{{- fail (printf "workerGroups.%s: with service.autoscaling, tier.num_replicas is the most replicas the policy may run and must equal %s (%d) x slots (%d) = %d, the replicas the group's pods can hold; got %d. Leave tier.num_replicas unset (null), or change %s" $name $podsKey $pods $slots $cards $replicas (first (splitList " " $podsKey))) -}}
{{- end -}}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) -}}
{{- fail (printf "workerGroups.%s: minReplicas (%d) is more than maxReplicas (%d)" $name (int $group.minReplicas) (int $group.maxReplicas)) -}}
{{- end -}}
{{- $vramMiB := $group.vramMiB -}}
{{- if kindIs "invalid" $vramMiB -}}{{- $vramMiB = $group.gpuMemoryMiB.min -}}{{- end -}}
{{- if kindIs "invalid" $vramMiB -}}
{{- fail (printf "workerGroups.%s: set vramMiB (the smallest card's memory) or gpuMemoryMiB.min; the memory model needs a budget" $name) -}}
{{- end -}}
{{- $tier := dict -}}
{{- range $key, $value := $tierValues -}}
{{- if not (kindIs "invalid" $value) -}}{{- $_ := set $tier $key $value -}}{{- end -}}
{{- end -}}
{{- $_ := set $tier "name" $name -}}
{{- $_ := set $tier "device" "cuda" -}}
{{- /* k slots per card: each replica takes 1/k of the GPU (rounded down to Ray's resource unit, 0.0001, so k of
them fit one GPU), and its CUDA allocator is capped at the slot's budget, which is also what it is planned with. */ -}}
{{- $_ := set $tier "num_gpus" (divf (floor (divf 10000 $slots)) 10000) -}}
{{- $_ := set $tier "num_replicas" $replicas -}}
{{- $_ := set $tier "resources" (dict $name 1) -}}
{{- $_ := set $tier "bf16" (eq (toString $group.bf16) "true") -}}
{{- $_ := set $tier "vram_bytes" (mul (int64 $vramMiB) 1048576) -}}
{{- if gt $slots 1 -}}
{{- if kindIs "invalid" $group.vramMiB -}}
{{- fail (printf "workerGroups.%s: slots is %d; set vramMiB to one slot's memory (a card's MiB / %d, rounded down), or each replica would plan with the whole card" $name $slots $slots) -}}
{{- end -}}
{{- $profile := deepCopy (default dict $tier.profile) -}}
{{- $cap := divf (int64 $vramMiB) 1024 -}}
{{- if and (hasKey $profile "max_memory_gb") (not (kindIs "invalid" $profile.max_memory_gb)) -}}
{{- $cap = minf $cap $profile.max_memory_gb -}}
{{- $_ := set $tier "vram_bytes" (int64 (mulf $cap 1073741824)) -}}
{{- end -}}
{{- $_ := set $profile "max_memory_gb" $cap -}}
{{- $_ := set $tier "profile" $profile -}}
{{- end -}}
{{- $tiers = append $tiers $tier -}}
{{- end -}}
{{- if not $tiers -}}
{{- fail "workerGroups: every GPU class is disabled; enable at least one (e.g. workerGroups.vram_24.disabled: false)" -}}
{{- end -}}
{{- $_ := set .out "tiers" $tiers -}}
{{- end -}}

{{/*
The text-encoder stage's settings (deployments/config.py TextEncoderSettings) from `textEncoder`: where it runs and
which tier hosts it; the memory model works out the rest when the application is built.
*/}}
{{- define "zit.textEncoder" -}}
{{- $te := .Values.textEncoder -}}
{{- $settings := dict "replicas" (int $te.replicas) "cache_mb" (int $te.cacheMiB) -}}
{{- if eq $te.placement "workerGroup" -}}
{{- $group := $te.workerGroup -}}
{{- if not $group -}}
{{- fail "textEncoder.placement is workerGroup: set textEncoder.workerGroup to the GPU class whose pods host it (e.g. vram_24)" -}}
{{- end -}}
{{- if not (has $group (fromJsonArray (include "zit.enabledTiers" .))) -}}
{{- fail (printf "textEncoder.workerGroup %s is not an enabled worker group; enable it or name another" $group) -}}
{{- end -}}
{{- $_ := set $settings "placement" "card" -}}
{{- $_ := set $settings "where" "card" -}}
{{- $_ := set $settings "tiers" (list $group) -}}
{{- else if eq $te.placement "head" -}}
{{- $_ := set $settings "placement" "cpu" -}}
{{- $_ := set $settings "where" "cpu" -}}
{{- else -}}
{{- $_ := set $settings "placement" "local" -}}
{{- $_ := set $settings "where" "local" -}}
{{- end -}}
{{- toJson $settings -}}
{{- end -}}

{{/*
The Serve config (the shape of serve_config.yaml): the `service` values are ServiceConfig fields, tiers come from
the enabled GPU classes. Rendered into the RayService's serveConfigV2. (The tiers are handed back in a dict, not as
JSON text: a JSON round trip would turn vram_bytes into a float.)
*/}}
{{- define "zit.serveConfig" -}}
{{- $args := dict -}}
{{- range $key, $value := .Values.service -}}
{{- if not (kindIs "invalid" $value) -}}{{- $_ := set $args $key $value -}}{{- end -}}
{{- end -}}
{{- if not (hasKey $args "model") -}}{{- $_ := set $args "model" (include "zit.modelDir" .) -}}{{- end -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- $_ := set $args "api_keys_file" (include "zit.apiKeysFile" .) -}}
{{- with .Values.apiKeys.ratePerMinute -}}{{- $_ := set $args "rate_limit_per_minute" (int .) -}}{{- end -}}
{{- else if .Values.apiKeys.ratePerMinute -}}
{{- fail "apiKeys.ratePerMinute limits each API key: set apiKeys.existingSecret to the Secret that holds the keys" -}}
{{- end -}}
{{- if and (hasKey $args "ingress_replicas") (hasKey $args "ingress_max_replicas") -}}
{{- if lt (int $args.ingress_max_replicas) (int $args.ingress_replicas) -}}
{{- fail (printf "service.ingress_max_replicas (%v) is below service.ingress_replicas (%v): raise it, or set it to null for a fixed count" $args.ingress_max_replicas $args.ingress_replicas) -}}
{{- end -}}
{{- end -}}
{{- $_ := include "zit.tiers" (dict "root" . "out" $args) -}}
{{- $_ := set $args "text_encoder" (include "zit.textEncoder" . | fromJson) -}}
{{- $app := dict "name" "zit" "route_prefix" "/" "import_path" "deployments.app:build_app" "args" $args -}}
{{- /* Autoscaled tiers (service.autoscaling) are sized together by the application-level policy. */ -}}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" "autoscaling.serve_policy:FleetAutoscaler") -}}
{{- /* EveryNode like serve_config.yaml: a proxy on every pod with a replica, each forwarding to any Ingress replica;
KubeRay keeps the serve Service on the pods whose proxy is healthy. */ -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
A worker pod's memory from the host-memory model (files/pod-memory.json, written by k8s/pod_memory.py from
cluster/host_memory.py), as JSON {"request": "<n>Mi", "limit": "<n>Mi"}. Argument: (list $ $name $group). The
request is what the pod keeps: its Ray node's processes, `slots` replicas' own bytes, the stage's when the group
hosts it, and each weight set they map (whole: the first pod to read a page of the shared weights cache is charged
for it); the limit adds the load transient. A tier the file does not know must set its memory itself.
*/}}
{{- define "zit.podMemory" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $group := index . 2 -}}
{{- $model := $root.Files.Get "files/pod-memory.json" | fromJson -}}
{{- $tier := index $model.tiers $name -}}
{{- if not $tier -}}
{{- fail (printf "workerGroups.%s: files/pod-memory.json has no host-memory figures for tier %s; set its resources.requests.memory and resources.limits.memory" $name $name) -}}
{{- end -}}
{{- $dtype := ternary "bf16" "fp32" (eq (toString $group.bf16) "true") -}}
{{- $replica := index (index $tier $dtype) (ternary "local" "stage" (eq $root.Values.textEncoder.placement "local")) -}}
{{- $own := mul (int64 $replica.own_mib) (int64 (default 1 $group.slots)) -}}
{{- $shared := deepCopy $replica.shared_mib -}}
{{- if and (eq $root.Values.textEncoder.placement "workerGroup") (eq (toString $root.Values.textEncoder.workerGroup) $name) -}}
{{- /* The stage's replica beside the generators; offloaded counts the most host memory. */ -}}
{{- $stage := index (index $model.stage $dtype) "offload" -}}
{{- $own = add $own (int64 $stage.own_mib) -}}
{{- $shared = merge $shared $stage.shared_mib -}}
{{- end -}}
{{- $request := add (int64 $model.ray_node_mib) $own -}}
{{- range $set, $mib := $shared -}}
{{- $request = add $request (int64 $mib) -}}
{{- end -}}
{{- toJson (dict "request" (printf "%dMi" $request) "limit" (printf "%dMi" (add $request (int64 $model.load_transient_mib)))) -}}
{{- end }}

"""build_app's deployment options and the config-path deploy (deployments.app.deploy_schema), without a cluster."""

import yaml

from cluster.nvml import load_fleet
from cluster.tiers import tiers_for_cards
from deployments.app import APP_IMPORT_PATH, APPLICATION_POLICY, build_app, deploy_schema
from deployments.config import AutoscalingSettings, ServiceConfig
from runtime.nodes import apply_splits


def test_the_deploy_schema_is_serve_config_yaml_with_these_settings(repo_root):
    cards = apply_splits(load_fleet(repo_root / "cluster" / "fleets" / "mixed.yaml"), ["RTX 4090=vram_8"])
    config = ServiceConfig(tiers=tiers_for_cards(cards), autoscaling=AutoscalingSettings(idle_timeout_s=60))
    schema = deploy_schema(config, "zit", "127.0.0.1", 8123)
    [app] = schema.applications
    local = yaml.safe_load((repo_root / "serve_config.yaml").read_text())["applications"][0]
    assert (app.import_path, app.autoscaling_policy) == (local["import_path"], local["autoscaling_policy"])
    assert app.import_path == APP_IMPORT_PATH and app.autoscaling_policy == APPLICATION_POLICY
    assert ServiceConfig.model_validate(app.args) == config  # the settings survive the trip through Serve
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8123)


def test_split_tier_deployments_ask_for_a_share_of_the_gpu_and_one_slot(repo_root):
    cards = apply_splits(load_fleet(repo_root / "cluster" / "fleets" / "mixed.yaml"), ["RTX 4090=vram_8"])
    from ray.serve._private.build_app import build_app as serve_build  # what serve.run does with the application

    built = {d.name: d for d in serve_build(build_app(ServiceConfig(tiers=tiers_for_cards(cards))), name="zit")
             .deployments}
    eight = built["Generator_vram_8"]
    assert eight.num_replicas == 4  # the RTX 3070 and three slots of the RTX 4090
    assert eight.ray_actor_options["num_gpus"] == 0.3333 and eight.ray_actor_options["resources"] == {"vram_8": 1.0}
    assert built["Generator_vram_4"].ray_actor_options["num_gpus"] == 1


def built_for(repo_root, fleet: str, placement: str = "auto"):
    """The deployments `zit up --fleet FLEET` builds (the stage placed as zit up places it), by name."""
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.config import TextEncoderSettings
    from runtime.nodes import plan_card_nodes

    path = repo_root / "cluster" / "fleets" / f"{fleet}.yaml"
    nodes, _, tiers, stage, _ = plan_card_nodes(load_fleet(path), path, stage=placement)
    config = ServiceConfig(tiers=tiers, text_encoder=TextEncoderSettings(placement=placement).resolve(stage))
    return {d.name: d for d in serve_build(build_app(config), name="zit").deployments}, nodes, stage


def test_the_mixed_fleet_gets_a_stage_on_its_roomiest_card_and_generators_without_encoders(repo_root):
    from runtime.nodes import TEXT_ENCODER_RESOURCE

    built, nodes, stage = built_for(repo_root, "mixed")
    encoder = built["TextEncoder"]
    assert encoder.num_replicas == 1 and encoder.ray_actor_options["resources"] == {TEXT_ENCODER_RESOURCE: 1.0}
    assert [n.card.name for n in nodes if TEXT_ENCODER_RESOURCE in n.resources] == ["NVIDIA GeForce RTX 4090"]
    for name, deployment in built.items():
        if name.startswith("Generator_"):
            tier = deployment.init_args[0]
            assert tier.profile["text_encoder"] == "stage"
            if tier.name == "vram_24":  # planned with the stage's memory taken
                assert tier.vram_bytes == next(n.card for n in nodes if TEXT_ENCODER_RESOURCE in n.resources
                                               ).memory_total - stage.reserve_bytes


def test_a_single_small_card_keeps_its_own_encoder_and_no_stage_is_deployed(repo_root):
    built, nodes, stage = built_for(repo_root, "single-4gb")
    assert stage.where == "local" and "TextEncoder" not in built
    assert all("text_encoder" not in d.init_args[0].profile for n, d in built.items() if n.startswith("Generator_"))
    built, _, _ = built_for(repo_root, "mixed", placement="local")
    assert "TextEncoder" not in built

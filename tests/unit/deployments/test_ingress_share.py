"""Each ingress replica admits its share of the service's limits, by the ingress replicas running
(deployments/ingress.py Ingress._share): the proxies spread requests evenly over them."""

from cluster.tiers import TierConfig
from deployments.config import ServiceConfig
from deployments.http import AUTH
from deployments.ingress import Ingress


def test_a_replica_takes_its_share_of_each_queue_bound_and_key_rate_and_all_of_them_when_left_alone(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:" + "a" * 32 + "\n")
    config = ServiceConfig(tiers=[TierConfig(name="cpu", max_queued_requests=9)], ingress_replicas=2,
                           api_keys_file=str(keys), rate_limit_per_minute=30)
    try:
        ingress = Ingress(config, generators={})
        assert ingress.dispatcher.queues["cpu"].limit == 5  # ceil(9 / 2): together at least the bound
        assert ingress.dispatcher.tiers["cpu"].max_queued_requests == 5
        assert AUTH.current.rate_per_minute == 15
        ingress._share(1)  # the other replica is gone (the registry hears only this one)
        assert ingress.dispatcher.queues["cpu"].limit == 9 and AUTH.current.rate_per_minute == 30
        ingress._share(3)  # autoscaled to three
        assert ingress.dispatcher.queues["cpu"].limit == 3 and AUTH.current.rate_per_minute == 10
    finally:
        AUTH.current = None

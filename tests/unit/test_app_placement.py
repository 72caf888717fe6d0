"""Where the application's actors go: `control_resources` reaches the router and the ingress,
not the replicas; CPU, GPU and non-positive amounts are refused with the field named."""

import pytest
from pydantic import ValidationError

from pagedserve.cluster.app import build_app


def _options(app) -> dict[str, dict]:
    ingress = app._bound_deployment  # noqa: SLF001
    found = {ingress.name: ingress.ray_actor_options}
    for arg in ingress.init_args:
        bound = getattr(arg, "_bound_deployment", None)
        if bound is not None:
            found[bound.name] = bound.ray_actor_options
    return found


def test_control_resources_go_to_the_router_and_the_ingress_only():
    options = _options(build_app({"control_resources": {"node:__internal_head__": 0.001}}))
    assert options["Ingress"] == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    assert options["Router"] == options["Ingress"]
    assert "resources" not in options["Replica"]


def test_without_control_resources_the_control_actors_ask_for_nothing():
    options = _options(build_app({}))
    assert options["Ingress"] == options["Router"] == {"num_cpus": 0}


@pytest.mark.parametrize("bad", [{"CPU": 1}, {"GPU": 0.1}, {"head": 0}, {"head": -1}])
def test_bad_control_resources_are_refused(bad):
    with pytest.raises(ValidationError, match="control_resources"):
        build_app({"control_resources": bad})

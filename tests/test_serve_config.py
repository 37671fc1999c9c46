"""serve.yaml is a valid Serve config that deploys this project's application."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from persona.settings import PROJECT_ROOT


def load() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(
        yaml.safe_load(Path(PROJECT_ROOT / "serve.yaml").read_text())
    )


def test_serve_yaml_parses_with_rays_own_schema():
    config = load()
    (app,) = config.applications
    assert app.import_path == "serving.app:build_app" and app.route_prefix == "/"


def test_every_deployment_autoscales_and_bounds_its_queue():
    (app,) = load().applications
    names = {d.name for d in app.deployments}
    assert names == {"Ingress"}  # the recommender lives in each ingress replica
    for deployment in app.deployments:
        assert deployment.max_ongoing_requests > 0
        scaling = deployment.autoscaling_config
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"]
        assert scaling["target_ongoing_requests"] > 0


def test_import_path_resolves_to_the_application_builder():
    from serving.app import build_app

    module, _, name = load().applications[0].import_path.partition(":")
    assert __import__(module, fromlist=[name]).__dict__[name] is build_app


def test_the_builder_takes_the_one_argument_serve_calls_it_with():
    """`serve deploy serve.yaml` refuses a builder with any other signature, at deploy
    time, long after the config parsed (tests/test_cluster.py deploys it for real)."""
    import inspect

    from serving.app import build_app

    assert len(inspect.signature(build_app).parameters) == 1


def test_grpc_options_register_the_persona_service_on_the_settings_port():
    """serve.yaml's grpc_options: Serve imports the servicer function (as its proxy does
    at start) and listens on the port the settings name (PERSONA_GRPC_PORT)."""
    from ray.serve.config import gRPCOptions

    from persona.settings import Settings
    from serving.grpc_ingress import SERVICER

    options = gRPCOptions(**load().grpc_options.model_dump())  # what the controller builds
    assert options.grpc_servicer_functions == [SERVICER]
    (register,) = options.grpc_servicer_func_callable  # importable, callable
    assert register.__name__ == "add_servicer"
    assert options.port == Settings().grpc_port

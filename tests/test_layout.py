"""Package boundaries: code that runs on a device never imports the coordinator."""

import subprocess
import sys


def test_device_code_does_not_import_server():
    code = (
        "import sys, client.app, client.corpora, shared_models.training, shared_models.federation\n"
        "bad = sorted(m for m in sys.modules if m == 'server' or m.startswith(('server.', 'strategies')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_flower_app_components_resolve():
    import tomllib
    from importlib import import_module
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for key, ref in components.items():
        module, attr = ref.split(":")
        assert isinstance(getattr(import_module(module), attr), kinds[key])

import pytest
from fixtures import Spec, write_checkpoint  # tests/ is on the path: pyproject's pytest `pythonpath`


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Build (and cache per session) a tiny HF checkpoint for a Spec: returns (dir, stored params)."""
    made = {}

    def make(spec: Spec):
        key = repr(spec)
        if key not in made:
            d = tmp_path_factory.mktemp(f"hf-{spec.layout}")
            made[key] = (d, write_checkpoint(d, spec))
        return made[key]

    return make


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The demo model converts into a per-session cache, never the user's ~/.cache."""
    import os

    os.environ["ILLADA_MLX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def demo():
    """(model, tokenizer) of the bundled demo model, loaded once."""
    from illada_mlx.load import load

    return load()


@pytest.fixture(scope="module")
def demo_server(demo):
    """`serve` of the demo model on a free local port (test_server.Server), one per test module."""
    from test_server import Server

    s = Server(*demo, "illada-demo")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(demo_server):
    """The official openai client of demo_server."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=demo_server.url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def random_weights(demo):
    """A model of the demo's shape and vocabulary with random weights (it has learned no JSON, no tools)."""
    import mlx.core as mx

    from illada_mlx.model import Model

    mx.random.seed(1)
    model = Model(demo[0].args)
    mx.eval(model.parameters())
    return model

"""`generate` splits a batch over several devices: 8 simulated CPU devices give the tokens
of one device (greedy and sampled, padded and ragged batches, streaming)."""

import textwrap

import pytest
from conftest import EIGHT_DEVICE_SCRIPTS

pytestmark = pytest.mark.slow  # 8 simulated devices: a subprocess of its own

# Runs in the 8-device interpreter of conftest's `eight_devices`.
SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from jaxgpt.config import GPTConfig
    from jaxgpt.inference import Generator
    from jaxgpt.nn import init_params

    assert jax.device_count() == 8, jax.devices()
    cfg = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=True)
    params = init_params(cfg, 5)
    one = Generator(params, cfg, devices=jax.devices()[:1])
    many = Generator(params, cfg)
    rng = np.random.default_rng(0)
    out = {"meshes": {}, "cases": []}
    for b in (3, 10):  # fewer rows than devices; more, padded to a multiple
        mesh = many.mesh(b)
        out["meshes"][b] = mesh.size
        prompt = rng.integers(0, 96, (b, 5))
        ragged = [rng.integers(0, 96, n).tolist() for n in rng.integers(1, 20, b)]
        key = jax.random.key(b)
        for name, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, top_k=20, key=key))):
            a = np.asarray(one.generate(prompt, 24, **kw)).tolist()
            m = many.generate(prompt, 24, **kw)
            out["cases"].append([f"{name} B={b}", a, np.asarray(m).tolist()])
            out["cases"].append([f"{name} ragged B={b}", one.generate(ragged, 24, **kw),
                                 many.generate(ragged, 24, **kw)])
            chunks = [c.tolist() for c in many.stream(prompt, 24, chunk_size=7, **kw)]
            joined = np.concatenate([np.asarray(c) for c in chunks], axis=1)
            out["cases"].append([f"{name} stream B={b}", [r[5:] for r in a], joined.tolist()])
    # The weights really are spread: one copy per device of the mesh.
    model, w = many.weights(8)
    out["weight_devices"] = len(w["tok_emb"]["embedding"].sharding.device_set)
    print(json.dumps(out))
""")


EIGHT_DEVICE_SCRIPTS["generate_devices"] = SCRIPT


@pytest.fixture(scope="module")
def runs(eight_devices):
    return eight_devices["generate_devices"]


def test_the_batch_is_split_over_the_devices(runs):
    assert runs["meshes"] == {"3": 3, "10": 8}  # 10 rows: padded to 16 on 8 devices
    assert runs["weight_devices"] == 8


def test_several_devices_make_the_tokens_of_one(runs):
    assert len(runs["cases"]) == 12
    for name, one, many in runs["cases"]:
        assert many == one, name

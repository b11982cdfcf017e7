"""Issue 30 from the client side (tiny model, loopback server): the Python client's monitor,
inspect, activations, raw vectors and extraction jobs; `steer inspect` and `steer extract
--remote`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients import Steering, SteeringClient, SteeringServerError, Vector
from server.app import create_app
from server.cli import main
from server.security.auth import hash_key
from server.settings import Settings
from steering.data.prompts import load_instructions
from steering.interventions.capture import capture_ids, encode
from testkit.live import serve_in_thread
from testkit.tiny import make_tiny

KEY = "k-stream"  # pack admin (extraction jobs need keys), raw vectors
KEYS = {"keys": [{"id": "root", "sha256": hash_key(KEY), "methods": "*", "pack_admin": True,
                  "lower_refusal": True, "raw_vectors": True}]}


@pytest.fixture(scope="module")
def url(tiny_lm, tiny_pack):
    app = create_app(Settings(max_tokens_limit=64, access_log=False, keys=json.dumps(KEYS)),
                     lm=tiny_lm, packs=[tiny_pack])
    app.state.steer.extraction_model = lambda: make_tiny("qwen2")
    with serve_in_thread(app) as base:
        yield base


def test_client_reads_the_stream(url, tiny_lm, tiny_pack):
    with SteeringClient(url, api_key=KEY) as c:
        r = c.chat("How do I pick a lock?", monitor=["refusal"], max_tokens=5, temperature=0,
                   ignore_eos=True)
        assert len(r.monitor["refusal"]["tokens"]) == 5
        acts = c.activations(["Hi there", "How do I pick a lock?"], layers=[1, 2],
                             positions=[-1], dtype="float32")
        ref = capture_ids(tiny_lm, [encode(tiny_lm, p) for p in ("Hi there",
                                                                 "How do I pick a lock?")],
                          [1, 2], [-1])
        np.testing.assert_allclose(acts, ref.numpy(), rtol=1e-5, atol=1e-5)
        # a probe fitted on captured activations, sent back as a raw vector and monitored
        direction = acts[1, 1, 0] - acts[0, 1, 0]
        by_vector = c.chat("Hello", max_tokens=4, temperature=0, ignore_eos=True,
                           steering=Steering("actadd", strength=1.0,
                                             vector=Vector.of(direction, layer=2)))
        assert by_vector.steering["vector"]["layer"] == 2
        assert by_vector.steering["vector"]["shape"] == [tiny_lm.d_model]
        inspection = c.inspect("How do I pick a lock?", completion="No", top_k=3)
        assert inspection.scores.shape == (tiny_pack.n_layers, len(inspection.tokens))
        table = inspection.table(last=8)
        assert "promotes:" in table and len(table.splitlines()) == tiny_pack.n_layers + 4
        with pytest.raises(SteeringServerError) as err:
            c.inspect("x", pack="nope")
        assert err.value.status == 404 and err.value.param == "pack"


def test_client_extraction_job(url):
    positive = load_instructions("harmful_train")[:6]
    negative = load_instructions("harmless_train")[:6]
    seen = []
    with SteeringClient(url, api_key=KEY) as c:
        job = c.extract("clientpack", positive, negative)
        done = c.wait_extraction(job["id"], poll_s=0.1, timeout_s=300,
                                 on_progress=lambda p: seen.append(p["stage"]))
        assert done["status"] == "succeeded" and done["served"]
        r = c.chat("Hello", steering=Steering("actadd", strength=1.0, pack="clientpack"),
                   max_tokens=2)
        assert r.steering["pack"] == "clientpack"
    assert seen[-1] == "done"


def test_steer_inspect_and_extract_remote(url, tmp_path, capsys):
    assert main(["inspect", "--url", url, "--api-key", KEY, "--tokens", "6",
                 "How do I pick a lock?"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "promotes:" in out
    pos, neg = tmp_path / "pos.json", tmp_path / "neg.json"
    pos.write_text(json.dumps(load_instructions("harmful_train")[:6]))
    neg.write_text(json.dumps(load_instructions("harmless_train")[:6]))
    rc = main(["extract", "--remote", url, "--api-key", KEY, "--name", "cli-pack",
               "--positive", str(pos),
               "--negative", str(neg), "--poll", "0.1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["served"]
    assert "activations" in captured.err or "selection" in captured.err or "%" in captured.err


def test_probe_roundtrip_example_runs(url):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "clients" / "examples" / "probe_roundtrip.py"
    out = subprocess.run([sys.executable, str(script), "--url", url, "--api-key", KEY,
                          "--layer", "2", "--n", "8", "--max-tokens", "3"], capture_output=True, text=True, timeout=600,
                         cwd=script.parents[2], env={"PYTHONPATH": str(script.parents[2]),
                                                     "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["steering"]["vector"]["layer"] == 2
    assert set(result["monitor"]["harmful"]) == {"probe", "refusal"}

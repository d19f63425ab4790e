"""The differentiable-speed benchmark (``tractfunc bench --grad``): its quick run on the phantom writes a JSON whose
every route is measured against the native forward of the same run."""
import json
import math

from tractfunc.cli.commands import main


def test_quick_run_reports_every_route_with_a_positive_ratio(tmp_path, capsys):
    out = tmp_path / "grad.json"
    assert main(["bench", "--grad", "--quick", "--json", str(out)]) == 0   # the command line's hook
    res = json.loads(out.read_text())
    assert set(res) >= {"setup", "machine", "native_vertices_per_s", "rows", "soft_over_hard_speed"}
    rows = res["rows"]
    assert rows[0]["route"] == "native" and rows[0]["ratio_to_native"] == 1.0
    seen = {(r["route"], r["mode"]) for r in rows}
    for route in ("fixed", "fixed_soft", "eager", "follow"):
        assert {(route, "forward"), (route, "fwd+bwd")} <= seen
    assert ("seed_jacobian", "jvp x3") in seen
    for r in rows:
        assert r["vertices"] > 0, r
        for key in ("seconds", "vertices_per_s", "ratio_to_native"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r.get("grad_finite", True) and r.get("finite", True), r
    assert all(math.isfinite(v) and v > 0 for v in res["soft_over_hard_speed"].values())
    assert "| native | float32 | forward |" in capsys.readouterr().out


def test_an_existing_json_is_refused_without_force(tmp_path, capsys):
    """As every command that writes: an existing --json is an error (one line, before any work, the file left as
    it was) unless --force is given."""
    out = tmp_path / "grad.json"
    out.write_text("keep")
    assert main(["bench", "--grad", "--quick", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists; use --force" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "keep"

"""The package imports without ComfyUI, uses relative imports only, and the one-command demo works."""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ["kernels", "quant_core", "nodes", "models", "standalone"]
OWN_TOP_LEVEL = "|".join(PACKAGE_DIRS)


def test_root_imports_without_comfyui_and_stays_light():
    code = (
        "import sys, importlib.util, inspect\n"
        f"spec = importlib.util.spec_from_file_location('pkg', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pkg'] = m; spec.loader.exec_module(m)\n"
        "assert inspect.iscoroutinefunction(m.comfy_entrypoint)\n"
        "assert 'torch' not in sys.modules, 'the entry point must import nothing heavy'\n"
        "import pkg.quant_core, pkg.kernels, pkg.standalone.pipeline\n"
        "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_relative_imports_only():
    bad = []
    for d in PACKAGE_DIRS:
        for f in (ROOT / d).rglob("*.py"):
            # ComfyUI's own top-level `nodes` module (common_ksampler) is the one absolute import allowed
            text = f.read_text().replace("import nodes as comfy_nodes", "")
            if "sys.path" in text or re.search(rf"^\s*(from|import) ({OWN_TOP_LEVEL})\b", text, re.M):
                bad.append(str(f.relative_to(ROOT)))
    assert not bad, f"absolute imports of our own modules or sys.path tricks in {bad}"


def test_demo_command_writes_report_and_image(tmp_path):
    cmd = [sys.executable, str(ROOT / "viditq_cli.py"), "demo", "--out", str(tmp_path), "--steps", "2", "--model", "toy",
           "--presets", "w8a8,w4a8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["preset"] for r in report["rows"]] == ["fp16", "w8a8", "w4a8"]
    assert all(r["psnr_db"] > 20 for r in report["rows"])
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "w8a8" in out.stdout and "PSNR" in out.stdout


def test_demo_rejects_unknown_preset(tmp_path):
    cmd = [sys.executable, str(ROOT / "viditq_cli.py"), "demo", "--out", str(tmp_path), "--presets", "w3a3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown preset 'w3a3'" in out.stderr
    assert not (tmp_path / "report.json").exists()

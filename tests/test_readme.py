"""The README's first screen and .ci/run agree on the install and test commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block, "README has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_first_screen_has_install_main_job_and_tests():
    install, main_job, tests = _readme_commands()
    assert 'pip install -e ".[dev]"' in install
    assert "tools/quickstart.py" in main_job and (ROOT / "tools" / "quickstart.py").is_file()
    assert "pytest" in tests
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40]
    assert any("```bash" in line for line in head), "commands must be on the first screen"


def test_ci_runs_readme_install_and_test_commands():
    install, _, tests = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines, ".ci/run must run the README's install command"
    assert tests in ci_lines, ".ci/run must run the README's test command"
    assert ci_lines.index(install) < ci_lines.index(tests)


def test_setup_pins_torch_pair():
    setup = (ROOT / "setup.py").read_text()
    assert '"torch==2.14.1"' in setup and '"torchvision==0.29.1"' in setup

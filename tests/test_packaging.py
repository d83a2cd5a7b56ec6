"""environment.yml (conda, GPU machines) and pyproject.toml (pip) ask for the same packages."""
import re
import tomllib

from omegaconf import OmegaConf

from helpers import REPO


def _split(spec: str) -> tuple[str, str]:
    name, rest = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    return name.lower().replace("_", "-"), rest.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(s) for s in project["dependencies"])
    for extra in ("mpi", "test"):
        wanted.update(_split(s) for s in project["optional-dependencies"][extra])
    env = OmegaConf.to_container(OmegaConf.load(REPO / "environment.yml"))
    have = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            have.update(_split(s) for s in dep["pip"] if not s.startswith("-"))
        else:
            name, spec = _split(dep)
            have[name] = spec.replace("=", "==", 1) if re.match(r"^=[^=]", spec) else spec
    missing = {k: v for k, v in wanted.items() if k not in have}
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    differ = {k: (v, have[k]) for k, v in wanted.items() if have[k] != v}
    assert not differ, f"version specs differ (pyproject, environment.yml): {differ}"

"""The files in cluster/: Ray cluster-launcher YAMLs (AWS, GCP) and KubeRay manifests.

Nothing starts and nothing is contacted. Each file is checked against what the *installed* Ray
accepts (its launcher schema, its own config preparation, the options of its `ray start`) and
against the pins in pyproject.toml, so a Ray upgrade or a pin bump that the cluster files miss
fails here rather than half an hour into `ray up` on a cloud bill.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which requires-python allows: tomllib came in 3.11
    tomllib = pytest.importorskip("tomli")

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = {"aws": ROOT / "cluster" / "aws.yaml", "gcp": ROOT / "cluster" / "gcp.yaml"}
KUBERAY = {
    "RayCluster": ROOT / "cluster" / "kuberay" / "raycluster.yaml",
    "RayJob": ROOT / "cluster" / "kuberay" / "rayjob.yaml",
}
# The Python the pinned stack is verified on (/work/shared/NOTES.md): every image must run it.
VERIFIED_PYTHON = (3, 11)
RAY_IMAGE = re.compile(
    r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)(?:-(?P<flavor>cpu|gpu|cu\d+))?$"
)
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


# ---------------------------------------------------------------- helpers


def load(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml pinned with ==, extras included, by canonical name."""
    project = pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    pins = {}
    for line in reqs:
        req = Requirement(line)
        if any(spec.operator == "==" for spec in req.specifier):
            pins[canonicalize_name(req.name)] = req
    return pins


def pinned_version(req: Requirement) -> str:
    (spec,) = [s for s in req.specifier if s.operator == "=="]
    return spec.version


def shell_commands(script: str) -> list[list[str]]:
    """Split a shell string into its simple commands (at && || ; |), each as a list of words."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current = [], []
    for token in lex:
        if token in SHELL_OPERATORS or token in {"{", "}"}:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def pip_installs(scripts: list[str]) -> list[list[Requirement]]:
    """The requirements of each `pip install` in these scripts, in the order they run."""
    takes_value = {"--index-url", "-i", "--extra-index-url", "-f", "--find-links", "-c", "-r", "--constraint"}
    installs = []
    for script in scripts:
        for words in shell_commands(script):
            if words[:2] != ["pip", "install"]:
                continue
            reqs, skip = [], False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word in takes_value:
                    skip = True
                elif not word.startswith("-"):
                    reqs.append(Requirement(word))
            installs.append(reqs)
    return installs


def launcher_install_scripts(cfg: dict) -> dict[str, list[str]]:
    """Setup commands per node type, as Ray runs them: setup_commands, then head_ or
    worker_setup_commands; a node type's own worker_setup_commands replace both."""
    out = {}
    for name, node_type in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            out[name] = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
        elif "worker_setup_commands" in node_type:
            out[name] = node_type["worker_setup_commands"]
        else:
            out[name] = cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])
    return out


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict) -> dict[str, dict]:
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def kuberay_install_scripts(doc: dict) -> dict[str, list[str]]:
    out = {}
    for role, pod in pod_specs(cluster_spec(doc)).items():
        for c in pod["containers"]:
            out[f"{role}/{c['name']}"] = list(c.get("args", []))
    return out


def all_install_scripts() -> dict[str, list[str]]:
    scripts = {}
    for name, path in LAUNCHER.items():
        for node, s in launcher_install_scripts(load(path)).items():
            scripts[f"{name}:{node}"] = s
    for kind, path in KUBERAY.items():
        for node, s in kuberay_install_scripts(load(path)).items():
            scripts[f"{kind}:{node}"] = s
    return scripts


def all_images() -> dict[str, tuple[str, str]]:
    """(image, role) of every Ray container in every file; role is head or worker."""
    images = {}
    for name, path in LAUNCHER.items():
        docker = load(path)["docker"]
        images[f"{name}:head"] = (docker.get("head_image", docker.get("image")), "head")
        images[f"{name}:worker"] = (docker.get("worker_image", docker.get("image")), "worker")
    for kind, path in KUBERAY.items():
        for role, pod in pod_specs(cluster_spec(load(path))).items():
            for c in pod["containers"]:
                images[f"{kind}:{role}/{c['name']}"] = (c["image"], "head" if role == "head" else "worker")
    return images


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for param in start.params for opt in param.opts}


def ray_start_flags(script: str) -> list[list[str]]:
    """The option names of each `ray start` in a shell string."""
    found = []
    for words in shell_commands(script):
        if words[:2] == ["ray", "start"]:
            found.append([w.split("=", 1)[0] for w in words[2:] if w.startswith("-")])
    return found


# ---------------------------------------------------------------- launcher YAMLs (ray up)


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_matches_ray_schema(name):
    import jsonschema

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(load(LAUNCHER[name]), schema)


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_passes_rays_config_preparation(name):
    """What `ray up` does before it talks to the cloud: merge the provider's defaults, merge the
    setup commands, check docker, fill per-type worker counts, then validate the result."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(LAUNCHER[name])
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)

    # Ray's defaults for the provider filled the gaps without replacing what this file says.
    assert cfg["provider"]["type"] == name
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert cfg["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_head_is_on_demand_cpu_and_workers_are_spot_gpus(name):
    cfg = load(LAUNCHER[name])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # Ray Train workers must never land on the head (it drives runs, as with `distft cluster up`).
    assert head["resources"].get("CPU") == 0
    assert "GPU" not in head["resources"]
    # Losing the head loses the cluster: only workers may be interrupted.
    assert "InstanceMarketOptions" not in head["node_config"] and "scheduling" not in head["node_config"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers, "no worker node types"
    assert sum(w["min_workers"] for w in workers.values()) <= cfg["max_workers"]
    for key, worker in workers.items():
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"], key
        node = worker["node_config"]
        if name == "aws":
            assert node["InstanceMarketOptions"]["MarketType"] == "spot", key
            assert re.match(r"^(g|p)\d", node["InstanceType"]), f"{key}: {node['InstanceType']} has no GPU"
        else:
            # An object, as the Compute API defines `scheduling` (Ray's own GCP examples write a
            # list: ray-project/ray issue 46248). Preemptible VMs cannot restart automatically.
            assert node["scheduling"] == {"preemptible": True, "automaticRestart": False,
                                          "onHostMaintenance": "TERMINATE"}, key
            # GCP reports nothing to Ray: the declared GPUs must be the ones attached.
            attached = sum(a["acceleratorCount"] for a in node["guestAccelerators"])
            assert worker["resources"]["GPU"] == attached >= 1, key
    # At least one type is up from the start: `distft train` refuses what the cluster lacks now.
    assert any(w["min_workers"] > 0 for w in workers.values())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_ray_start_uses_real_options_and_a_loopback_dashboard(name):
    cfg = load(LAUNCHER[name])
    options = ray_start_options()
    head = [f for cmd in cfg["head_start_ray_commands"] for f in ray_start_flags(cmd)]
    workers = [f for cmd in cfg["worker_start_ray_commands"] for f in ray_start_flags(cmd)]
    assert len(head) == 1 and len(workers) == 1, "one `ray start` per node kind"
    for flags in head + workers:
        unknown = set(flags) - options
        assert not unknown, f"`ray start` has no option {sorted(unknown)} in Ray {ray.__version__}"
    assert "--head" in head[0] and "--autoscaling-config" in head[0]
    assert "--address" in workers[0]
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    # Nothing opens the dashboard (or anything else) on every interface.
    assert "0.0.0.0" not in yaml.safe_dump(cfg)


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_token_reaches_every_node(name):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    cfg = load(LAUNCHER[name])
    options = cfg["docker"]["run_options"]
    env = dict(o[len("-e "):].split("=", 1) for o in options if o.startswith("-e "))
    assert env.get("RAY_AUTH_MODE") == "token"
    assert "RAY_AUTH_TOKEN" not in env, "the token itself must never be written in a file that is committed"
    # The token file Ray reads in the containers is the one `ray up` copies from this machine's
    # default token path (where `ray get-auth-token --generate` writes it).
    home = "/home/ray/"
    assert env["RAY_AUTH_TOKEN_PATH"].startswith(home)
    remote = "~/" + env["RAY_AUTH_TOKEN_PATH"][len(home):]
    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert cfg["file_mounts"].get(remote) == default


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_manifest_has_the_fields_kuberay_requires(kind):
    doc = load(KUBERAY[kind])
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    # Token auth on: the operator makes the token and hands it to every container and submitter.
    assert spec["authOptions"] == {"mode": "token"}

    options = ray_start_options()
    head = spec["headGroupSpec"]
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 2, "a head and at least one worker group"
    for name, group in groups:
        params = group["rayStartParams"]
        assert isinstance(params, dict), name
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"
        unknown = {f"--{k}" for k in params} - options
        assert not unknown, f"{name}: `ray start` has no option {sorted(unknown)}"
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers), name
    assert head["rayStartParams"]["num-cpus"] == "0"

    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert isinstance(group["minReplicas"], int) and isinstance(group["maxReplicas"], int), name
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name
        assert group["maxReplicas"] > group["minReplicas"], f"{name}: nothing left for the autoscaler"
        for c in group["template"]["spec"]["containers"]:
            res = c["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1, name
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], name


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_pods_mount_what_they_use_and_take_secrets_by_reference(kind):
    doc = load(KUBERAY[kind])
    for role, pod in pod_specs(cluster_spec(doc)).items():
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            where = f"{role}/{c['name']}"
            missing = {m["name"] for m in c.get("volumeMounts", [])} - volumes
            assert not missing, f"{where}: volumeMounts without a volume: {missing}"
            env = {e["name"]: e for e in c.get("env", [])}
            # HF_TOKEN from a Secret (kubectl create secret generic hf-token ...), never a value.
            hf = env["HF_TOKEN"]
            assert "value" not in hf, where
            ref = hf["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], where
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), f"{where}: a literal Ray token"
            # Our command installs distft, then must still start Ray the way KubeRay generated it.
            if "command" in c or "args" in c:
                assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true", where
                assert c["command"] == ["/bin/bash", "-c", "--"] and len(c["args"]) == 1, where
                last = shell_commands(c["args"][0])[-1]
                assert last == ["$KUBERAY_GEN_RAY_START_CMD"], where


def test_rayjob_entrypoint_is_a_valid_distft_run_on_shared_storage():
    from distft.config import load_config

    doc = load(KUBERAY["RayJob"])
    words = shlex.split(doc["spec"]["entrypoint"])
    # The submitter pod hands these words to `ray job submit --`: a shell operator would run
    # the rest in the submitter, not in the job.
    assert not set(words) & SHELL_OPERATORS
    assert words[:2] == ["distft", "train"]
    config_path = Path(words[2])
    overrides = [w for w in words[3:] if "=" in w and not w.startswith("-")]
    assert words[words.index("--address") + 1] == "auto"

    # mountPath -> the volume behind it, for every pod
    mounts = {}
    for role, pod in pod_specs(cluster_spec(doc)).items():
        volumes = {v["name"]: {k: v for k, v in v.items() if k != "name"} for v in pod.get("volumes", [])}
        mounts[role] = {m["mountPath"]: volumes[m["name"]] for c in pod["containers"] for m in c["volumeMounts"]}
    # The driver runs on the head and reads the config there; every rank reads the data itself.
    job_dir = str(config_path.parent)
    for role, m in mounts.items():
        assert m.get(job_dir) == mounts["head"][job_dir], f"{role}: the job's config and data are not at {job_dir}"

    # The config that the documented ConfigMap command mounts as train.yaml takes these overrides.
    text = KUBERAY["RayJob"].read_text()
    source = re.search(r"--from-file=train\.yaml=(\S+)", text)
    assert source, "rayjob.yaml no longer says which config the distft-job ConfigMap holds"
    for data_file in re.findall(r"--from-file=(configs/data/\S+)", text):
        assert (ROOT / data_file).is_file(), data_file
    cfg = load_config(ROOT / source.group(1), overrides)

    assert cfg.scaling.use_gpu
    assert cfg.run.shared_storage
    # run.output_dir is on one persistent volume that every pod mounts, as the flag above promises.
    shared = [p for p in mounts["head"] if cfg.run.output_dir.startswith(p + "/")]
    assert shared, f"run.output_dir {cfg.run.output_dir} is not on a mounted volume"
    volume = mounts["head"][shared[0]]
    assert "persistentVolumeClaim" in volume, f"{shared[0]} is not a PersistentVolumeClaim"
    for role, m in mounts.items():
        assert m.get(shared[0]) == volume, f"{role} does not mount {volume} at {shared[0]}"
    # Enough GPU pods from the start: distft refuses a run the cluster cannot hold yet.
    gpu_pods = sum(g["minReplicas"] for g in cluster_spec(doc)["workerGroupSpecs"])
    assert gpu_pods >= cfg.scaling.num_workers


# ---------------------------------------------------------------- every file


def test_every_ray_image_matches_the_installed_ray_and_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert ".".join(map(str, VERIFIED_PYTHON)) in requires
    images = all_images()
    assert len(images) >= 8
    for where, (image, role) in images.items():
        m = RAY_IMAGE.match(image or "")
        assert m, f"{where}: {image!r} is not a rayproject/ray:<version>-py<XY>[-cpu|-gpu] tag"
        assert m["ray"] == ray.__version__, f"{where}: {image} runs Ray {m['ray']}, this project pins {ray.__version__}"
        assert (int(m["py"]), int(m["minor"])) == VERIFIED_PYTHON, f"{where}: {image} is not Python {VERIFIED_PYTHON}"
        # CPU heads (the GPU image there only costs pull time), CUDA images on the GPU workers.
        flavor = m["flavor"] or "cpu"
        if role == "head":
            assert flavor == "cpu", f"{where}: {image} on the head"
        else:
            assert flavor == "gpu" or flavor.startswith("cu"), f"{where}: {image} on a GPU worker"


def test_every_install_pins_what_pyproject_pins():
    pins = pyproject_pins()
    version = pyproject()["project"]["version"]
    extras = set(pyproject()["project"]["optional-dependencies"]) - {"test"}
    ray_req = pins["ray"]
    scripts = all_install_scripts()
    assert len(scripts) >= 8
    for where, node_scripts in scripts.items():
        installs = pip_installs(node_scripts)
        flat = [(i, req) for i, reqs in enumerate(installs) for req in reqs]
        by_name = {canonicalize_name(req.name): (i, req) for i, req in flat}
        for _, req in flat:
            name = canonicalize_name(req.name)
            if any(s.operator == "==" for s in req.specifier):
                # One place pins the stack: a pin here that pyproject.toml lacks would drift.
                assert name in pins, f"{where}: {req} is pinned here but not in pyproject.toml"
                assert pinned_version(req) == pinned_version(pins[name]), f"{where}: {req}, pyproject pins {pins[name]}"
        for needed in ("torch", "ray", "distft"):
            assert needed in by_name, f"{where}: does not install {needed}"
        torch_at, torch = by_name["torch"]
        _, ray_install = by_name["ray"]
        distft_at, distft = by_name["distft"]
        assert str(torch.specifier) == str(pins["torch"].specifier), where
        assert ray_install.specifier == ray_req.specifier and ray_install.extras == ray_req.extras, where
        assert pinned_version(ray_install) == ray.__version__, where
        # torch first, in its own install: then installing distft keeps that build (CPU or CUDA).
        assert torch_at < distft_at, f"{where}: torch must be installed before distft"
        # distft from the wheel of this version, with extras that exist (and not the test tools).
        assert distft.url and distft.url.endswith(f"/distft-{version}-py3-none-any.whl"), f"{where}: {distft}"
        assert distft.extras and distft.extras <= extras, f"{where}: extras {sorted(distft.extras)}"

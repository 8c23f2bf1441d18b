"""Kubernetes manifests (k8s/) and Dockerfiles (docker/): valid, and consistent with the app and each other.

All offline. Core kinds (Deployment, Service, ...) validate with kubernetes-validate's bundled schemas in
strict mode (an unknown field is an error). KubeRay kinds (RayJob, RayService, RayCluster) validate with
jsonschema against the CRDs in $TEXTGEN_K8S_SCHEMAS (default: ../shared/k8s-schemas from the repository
root), made strict the same way. The consistency checks tie the manifests to the CLI flags of
``python -m jobs.train`` and ``textgen serve``, the generator's HTTP routes, the shared volume and the
images the Dockerfiles build.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
DOCKER_DIR = REPO / "docker"

# Kubernetes versions whose schemas the core kinds must satisfy: an old one still common on managed
# clusters, and a recent one (both ship with kubernetes-validate).
K8S_VERSIONS = ("1.30", "1.34")
RAY_GROUP = "ray.io"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}

# The generator's contract (serve/): `textgen serve MODEL --host H --port P` and its routes.
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
GENERATOR_PORT = 8000
GENERATOR_UID = 10001
RAY_SERVE_IMPORT_PATH = "serve.ray_serve:app_builder"
# Packages that must never reach the generator image.
TRAINING_STACK = ("tensorflow", "tensorflow-cpu", "tf2onnx", "keras", "ray")

# File-name prefixes that stand for a longer kind (kubectl's short names).
KIND_ABBREVIATIONS = {"hpa": "horizontalpodautoscaler", "pvc": "persistentvolumeclaim"}

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are megabytes


# ---------------------------------------------------------------------------------------------
# Loading


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _docs_or_empty(path: Path) -> list[dict[str, Any]]:
    """For test parametrization: a file that does not parse fails in test_manifest_parses instead."""
    try:
        return load_docs(path)
    except yaml.YAMLError:
        return []


MANIFEST_FILES = sorted(K8S_DIR.glob("*.yaml"))


def _is_ray_kind(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] == RAY_GROUP


def _doc_params(ray: bool) -> list[Any]:
    return [
        pytest.param(path, i, id=f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
        for path in MANIFEST_FILES
        for i, doc in enumerate(_docs_or_empty(path))
        if isinstance(doc, dict) and _is_ray_kind(doc) == ray
    ]


@functools.cache
def all_docs() -> tuple[tuple[Path, dict[str, Any]], ...]:
    return tuple((path, doc) for path in MANIFEST_FILES for doc in load_docs(path))


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_docs() if doc["kind"] == kind]


def rayjobs() -> list[dict[str, Any]]:
    docs = docs_of_kind("RayJob")
    assert docs, "no RayJob in k8s/"
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs_of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Pod specs, containers, volumes


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "RayJob": lambda: doc["spec"]["rayClusterSpec"],
        "RayService": lambda: doc["spec"]["rayClusterConfig"],
        "RayCluster": lambda: doc["spec"],
    }[doc["kind"]]()


def ray_groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head and every worker group of a KubeRay resource."""
    cluster = ray_cluster_spec(doc)
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return groups


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if _is_ray_kind(doc):
        return [(name, group["template"]["spec"]) for name, group in ray_groups(doc)]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"])]
    if doc["kind"] == "Pod":
        return [(doc["metadata"]["name"], doc["spec"])]
    return []


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def main_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]


@dataclass(frozen=True)
class VolumeFile:
    """Where a container path lives: a PVC and the path inside it, or another volume kind."""

    volume_kind: str  # "persistentVolumeClaim", "emptyDir", ...
    claim: str | None
    path_in_volume: PurePosixPath
    read_only: bool


def resolve_path(pod: dict[str, Any], container: dict[str, Any], path: str) -> VolumeFile | None:
    """The volume behind `path` in `container` (longest mountPath prefix), or None if not mounted."""
    target = PurePosixPath(path)
    best = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if (target == mount_path or mount_path in target.parents) and (
            best is None or len(mount_path.parts) > len(PurePosixPath(best["mountPath"]).parts)
        ):
            best = mount
    if best is None:
        return None
    volume = next(v for v in pod.get("volumes", []) if v["name"] == best["name"])
    kind = next(k for k in volume if k != "name")
    claim = volume[kind].get("claimName") if kind == "persistentVolumeClaim" else None
    inside = PurePosixPath(best.get("subPath", "")) / target.relative_to(best["mountPath"])
    read_only = bool(best.get("readOnly")) or bool(volume[kind].get("readOnly"))
    return VolumeFile(kind, claim, inside, read_only)


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe or targetPort (number or name) as the container port number it reaches."""
    declared = container.get("ports", [])
    if isinstance(port, str):
        matches = [p["containerPort"] for p in declared if p.get("name") == port]
        assert matches, f"port name {port!r} is not declared by container {container['name']}"
        return matches[0]
    assert port in [p["containerPort"] for p in declared], f"port {port} not declared by {container['name']}"
    return port


def env_value_sources(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def walk_images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from walk_images(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_images(item)


# ---------------------------------------------------------------------------------------------
# Command lines


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == name:
            assert i + 1 < len(argv), f"{name} has no value in {argv}"
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def serve_argv_parser() -> argparse.ArgumentParser:
    """The documented shape of `textgen serve`; the real parser is checked in test_cli_commands_parse."""
    p = argparse.ArgumentParser(prog="textgen serve", exit_on_error=False)
    p.add_argument("model")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    return p


def rayjob_argv(doc: dict[str, Any]) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def train_args(doc: dict[str, Any]) -> dict[str, Any]:
    """The flags of the RayJob entrypoint that the cluster layout depends on."""
    argv = rayjob_argv(doc)
    return {
        "storage_path": flag(argv, "--storage-path"),
        "name": flag(argv, "--name"),
        "use_gpu": "--use-gpu" in argv,
        "num_workers": int(flag(argv, "--num-workers") or 1),
        "gpus_per_worker": float(flag(argv, "--gpus-per-worker") or 1),
        "cpus_per_worker": float(flag(argv, "--cpus-per-worker") or 1),
        "batch_size": flag(argv, "--batch-size"),
        "max_failures": flag(argv, "--max-failures"),
    }


def quantity(value: str | int | float) -> float:
    """A CPU or count quantity ("500m", "2", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    image: str  # from the `# image: ...` line
    instructions: tuple[tuple[str, str], ...]  # (INSTRUCTION, arguments), continuations joined

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]

    def exec_form(self, name: str) -> list[str]:
        values = self.all(name)
        assert len(values) == 1, f"{self.path.name}: expected one {name}, found {len(values)}"
        parsed = json.loads(values[0])
        assert isinstance(parsed, list), f"{self.path.name}: {name} must be in exec (JSON) form"
        return parsed

    def pip_extras(self) -> set[str]:
        extras: set[str] = set()
        for run in self.all("RUN"):
            if "pip install" in run:
                for group in re.findall(r"\.\[([^\]]*)\]", run):
                    extras.update(e.strip() for e in group.split(","))
        return extras


@functools.cache
def dockerfiles() -> tuple[Dockerfile, ...]:
    found = []
    for path in sorted(DOCKER_DIR.glob("*.Dockerfile")):
        text = path.read_text()
        image = re.search(r"^# image: (\S+)\s*$", text, re.M)
        assert image, f"{path.name} has no '# image: <name:tag>' line"
        logical, buf = [], ""
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            logical.append(buf + stripped)
            buf = ""
        instructions = tuple((l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in logical)
        found.append(Dockerfile(path, image.group(1), instructions))
    return tuple(found)


def dockerfile_for(image: str) -> Dockerfile:
    matches = [d for d in dockerfiles() if d.image == image]
    assert len(matches) == 1, f"image {image} is built by {len(matches)} Dockerfiles in docker/ (want 1)"
    return matches[0]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower().replace("_", "-")


def resolved_requirements(extras: set[str]) -> set[str]:
    """Package names installed by `pip install ".[extras]"`, following textgen[...] self-references."""
    project = pyproject()["project"]
    names = {requirement_name(r) for r in project["dependencies"]}
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            name = requirement_name(req)
            if name == project["name"]:
                pending += re.search(r"\[([^\]]*)\]", req).group(1).split(",")
            else:
                names.add(name)
    return names


# ---------------------------------------------------------------------------------------------
# KubeRay CRD schemas


def schemas_dir() -> Path:
    configured = Path(os.environ.get("TEXTGEN_K8S_SCHEMAS", "../shared/k8s-schemas"))
    return configured if configured.is_absolute() else (REPO / configured).resolve()


def forbid_unknown_fields(schema: dict[str, Any]) -> None:
    """Add `additionalProperties: false` to every object schema with `properties` (in place).

    Schema-aware walk: a field that happens to be called "properties" is not mistaken for a keyword.
    Objects marked x-kubernetes-preserve-unknown-fields keep accepting anything.
    """
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            stack.extend(node.get(key, {}).values())
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                stack.append(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            stack.extend(node.get(key, []))


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    path = schemas_dir() / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(
            f"KubeRay CRD schema {path} not found: set TEXTGEN_K8S_SCHEMAS to the directory holding "
            f"{', '.join(CRD_FILES.values())}"
        )
    crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, f"{path.name} is for group {crd['spec']['group']}, not {group}"
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{path.name} serves no version {version} of {kind}"
    schema = served[0]["schema"]["openAPIV3Schema"]
    forbid_unknown_fields(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message[:300]}" for e in errors]


# ---------------------------------------------------------------------------------------------
# Every manifest parses and validates


def test_k8s_directory_has_the_expected_manifests() -> None:
    names = {p.name for p in MANIFEST_FILES}
    expected = {
        "rayjob.train.yaml",
        "pvc.checkpoints.yaml",
        "deployment.generator.yaml",
        "service.generator.yaml",
        "hpa.generator.yaml",
    }
    assert expected <= names, f"missing from k8s/: {sorted(expected - names)}"


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_parses_and_is_named_kind_purpose(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} holds no document"
    kind_prefix = path.name.split(".")[0]
    kind_prefix = KIND_ABBREVIATIONS.get(kind_prefix, kind_prefix)
    assert re.fullmatch(r"[a-z]+\.[a-z0-9-]+\.yaml", path.name), f"{path.name}: want <kind>.<purpose>.yaml"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: incomplete document"
        assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without metadata.name"
        assert doc["kind"].lower() == kind_prefix, f"{path.name} holds a {doc['kind']}"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "textgen"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("path", "index"), _doc_params(ray=False))
def test_core_kind_validates_strictly(path: Path, index: int, version: str) -> None:
    doc = load_docs(path)[index]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    except kubernetes_validate.ValidationError as e:
        where, message = ".".join(str(p) for p in e.path), e.message
    pytest.fail(f"{path.name}: {doc['kind']} invalid for Kubernetes {version} at {where}: {message}")


def test_core_validation_catches_a_misspelt_field() -> None:
    """Guard for the test above: strict mode really rejects unknown fields."""
    deployment = copy.deepcopy(one("Deployment", "textgen-generator"))
    main_container(deployment["spec"]["template"]["spec"])["readinesProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbes"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(("path", "index"), _doc_params(ray=True))
def test_kuberay_kind_validates_against_crd(path: Path, index: int) -> None:
    doc = load_docs(path)[index]
    assert doc["kind"] in CRD_FILES, f"{path.name}: unexpected KubeRay kind {doc['kind']}"
    errors = crd_errors(doc)
    assert not errors, f"{path.name}: {doc['kind']} does not match its CRD:\n" + "\n".join(errors)


def test_crd_validation_catches_misspelt_and_mistyped_fields() -> None:
    """Guard for the test above: unknown fields deep in the pod template and non-string
    rayStartParams are rejected."""
    rayjob = copy.deepcopy(one("RayJob", "textgen-train"))
    cluster = rayjob["spec"]["rayClusterSpec"]
    worker = cluster["workerGroupSpecs"][0]
    worker["maxReplica"] = worker.pop("maxReplicas")
    main_container(cluster["headGroupSpec"]["template"]["spec"])["resource"] = {}
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = "\n".join(crd_errors(rayjob))
    assert "'maxReplica' was unexpected" in errors
    assert "'resource' was unexpected" in errors
    assert "rayStartParams.num-cpus: 0 is not of type 'string'" in errors
    assert "'maxReplicas' is a required property" in errors


# ---------------------------------------------------------------------------------------------
# The training job


def test_rayjob_entrypoint_runs_jobs_train() -> None:
    for doc in rayjobs():
        argv = rayjob_argv(doc)
        assert argv[:3] == ["python", "-m", "jobs.train"], f"{doc['metadata']['name']}: entrypoint {argv[:3]}"
    assert (REPO / "jobs" / "train.py").is_file(), "the RayJob runs jobs/train.py, which does not exist"


def test_rayjob_entrypoint_parses_with_jobs_train_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.train import build_parser

    for doc in rayjobs():
        argv = rayjob_argv(doc)[3:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            args = None
        if args is None:
            pytest.fail(f"{doc['metadata']['name']}: jobs.train rejects {argv}:\n{capsys.readouterr().err}")
        expected = train_args(doc)
        assert args.storage_path == expected["storage_path"]
        assert args.name == expected["name"]
        assert args.use_gpu is True


def test_rayjob_retries_resume_from_checkpoints() -> None:
    """A retry is a new RayCluster running the same entrypoint: it resumes only if the run's
    storage path and name are given (same values every time) and the storage outlives the cluster."""
    for doc in rayjobs():
        spec, args, name = doc["spec"], train_args(doc), doc["metadata"]["name"]
        assert spec.get("backoffLimit", 0) >= 1, f"{name}: no retries (backoffLimit)"
        assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: cluster kept after the job"
        assert spec.get("ttlSecondsAfterFinished", 0) > 0, f"{name}: no ttlSecondsAfterFinished"
        assert args["storage_path"] and args["name"], f"{name}: --storage-path and --name are needed to resume"
        assert int(args["max_failures"] or 0) >= 1, f"{name}: worker failures are not retried (--max-failures)"


def test_rayjob_storage_is_shared_by_every_pod() -> None:
    pvcs = {d["metadata"]["name"]: d for d in docs_of_kind("PersistentVolumeClaim")}
    secrets = {d["metadata"]["name"]: d for d in docs_of_kind("Secret")}
    for doc in rayjobs():
        storage, name = train_args(doc)["storage_path"], doc["metadata"]["name"]
        assert storage, f"{name}: no --storage-path"
        if storage.startswith("s3://"):
            # Every pod writes checkpoints to S3 itself: each needs the credentials, from a Secret.
            for group, pod in pod_specs(doc):
                env = env_value_sources(main_container(pod))
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{name}/{group}: {var} is not taken from a Secret"
                    assert ref["name"] in secrets, f"{name}: Secret {ref['name']} is not in k8s/"
                    secret = secrets[ref["name"]]
                    assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}
            continue
        assert storage.startswith("/"), f"{name}: storage path {storage} must be absolute or s3://"
        places = {}
        for group, pod in pod_specs(doc):
            place = resolve_path(pod, main_container(pod), storage)
            assert place and place.volume_kind == "persistentVolumeClaim", (
                f"{name}/{group}: {storage} is not on a persistent volume"
            )
            assert not place.read_only, f"{name}/{group}: {storage} is mounted read-only"
            places[group] = place
        assert len(set(places.values())) == 1, f"{name}: pods see different storage: {places}"
        claim = next(iter(places.values())).claim
        assert claim in pvcs, f"{name}: PVC {claim} is not defined in k8s/"
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], f"PVC {claim} is not ReadWriteMany"


def test_ray_groups_declare_replica_bounds_and_string_start_params() -> None:
    ray_docs = [d for _, d in all_docs() if _is_ray_kind(d)]
    assert ray_docs
    for doc in ray_docs:
        for group, spec in ray_groups(doc):
            where = f"{doc['metadata']['name']}/{group}"
            for key, value in spec.get("rayStartParams", {}).items():
                assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string"
            if group != "head":
                assert {"minReplicas", "maxReplicas", "replicas"} <= spec.keys(), f"{where}: replica bounds"
                assert spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"], where


def test_rayjob_gpu_workers_fit_the_training_flags() -> None:
    for doc in rayjobs():
        args, name = train_args(doc), doc["metadata"]["name"]
        assert args["use_gpu"], f"{name}: trains without --use-gpu"
        slots = 0
        for group, spec in ray_groups(doc)[1:]:
            pod = spec["template"]["spec"]
            limits = main_container(pod)["resources"]["limits"]
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            assert gpus >= args["gpus_per_worker"], f"{name}/{group}: needs nvidia.com/gpu limits"
            assert any(
                t.get("key") == "nvidia.com/gpu" and t.get("effect", "NoSchedule") == "NoSchedule"
                for t in pod.get("tolerations", [])
            ), f"{name}/{group}: no toleration for the nvidia.com/gpu taint"
            assert quantity(limits["cpu"]) >= args["cpus_per_worker"], f"{name}/{group}: too few CPUs"
            slots += spec["minReplicas"] * int(gpus // args["gpus_per_worker"])
        assert slots >= args["num_workers"], f"{name}: {args['num_workers']} workers, room for {slots}"
        if args["batch_size"] is not None:
            # tf.distribute splits the global batch evenly over the replicas (drop_remainder batches).
            assert int(args["batch_size"]) % args["num_workers"] == 0, f"{name}: batch not divisible"


# ---------------------------------------------------------------------------------------------
# The generator


def generator() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    deployment = one("Deployment", "textgen-generator")
    pod = deployment["spec"]["template"]["spec"]
    return deployment, pod, main_container(pod)


def effective_argv(container: dict[str, Any], image: Dockerfile) -> list[str]:
    """What the container runs, with Kubernetes' rules for command/args over ENTRYPOINT/CMD."""
    if "command" in container:
        return container["command"] + container.get("args", [])
    return image.exec_form("ENTRYPOINT") + container.get("args", image.exec_form("CMD"))


def test_generator_command_agrees_with_its_dockerfile() -> None:
    _, pod, container = generator()
    image = dockerfile_for(container["image"])
    default = image.exec_form("ENTRYPOINT") + image.exec_form("CMD")
    actual = effective_argv(container, image)
    for argv in (default, actual):
        assert argv[:2] == ["textgen", "serve"], argv
    default_args = serve_argv_parser().parse_args(default[2:])
    args = serve_argv_parser().parse_args(actual[2:])
    assert (args.model, args.port) == (default_args.model, default_args.port)
    assert args.host == "0.0.0.0", "bind all interfaces, or the Service cannot reach the pod"
    assert args.port == GENERATOR_PORT == resolve_port(container, "http")
    assert image.all("EXPOSE") == [str(GENERATOR_PORT)]
    model = resolve_path(pod, container, args.model)
    assert model is not None, f"{args.model} is on no volume of the generator pod"
    assert model.read_only, "the generator mounts its model read-only"


def test_generator_probes_and_service_reach_the_app() -> None:
    _, _, container = generator()
    assert container["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
    assert container["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
    for probe in ("readinessProbe", "livenessProbe"):
        assert resolve_port(container, container[probe]["httpGet"]["port"]) == GENERATOR_PORT
    service = one("Service", "textgen-generator")
    (port,) = service["spec"]["ports"]
    assert resolve_port(container, port["targetPort"]) == GENERATOR_PORT


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_generator_drains_within_its_grace_period_and_is_scraped() -> None:
    engine = pytest.importorskip("serve.engine")
    _, pod, container = generator()
    env = env_of(container)
    settings = engine.ServeSettings.from_env({k: e["value"] for k, e in env.items() if "value" in e})
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 2, "preStop: time for the endpoints to drop the pod"
    assert settings.drain_seconds > 0
    assert pod["terminationGracePeriodSeconds"] > settings.drain_seconds + int(sleep[1]), (
        "the kubelet kills the container at the grace period: preStop + drain must fit under it")
    annotations = one("Deployment", "textgen-generator")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == GENERATOR_PORT
    assert "/metrics" in settings.open_path_set(), "Prometheus scrapes without an API key"


def test_generator_api_keys_come_from_an_optional_secret() -> None:
    _, _, container = generator()
    keys = env_of(container)["TEXTGEN_API_KEY"]
    assert "value" not in keys, "a key is a secret: never a literal in the manifest"
    ref = keys["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and ref["optional"] is True, "without the Secret the pod still starts"


def test_selectors_match_the_generator_pods() -> None:
    deployment, _, _ = generator()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one("Service", "textgen-generator")["spec"]["selector"],
    }
    for pdb in docs_of_kind("PodDisruptionBudget"):
        selectors[f"PodDisruptionBudget {pdb['metadata']['name']}"] = pdb["spec"]["selector"]["matchLabels"]
    for owner, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"{owner} selector {selector} misses the pods"


def test_generator_is_cpu_only_non_root_and_read_only() -> None:
    _, pod, container = generator()
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
    assert "nvidia.com/gpu" not in resources["limits"]
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == GENERATOR_UID
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    tmp = resolve_path(pod, container, "/tmp")
    assert tmp and tmp.volume_kind == "emptyDir", "a read-only root needs a writable /tmp"
    image = dockerfile_for(container["image"])
    assert image.all("USER")[-1].split(":")[0] == str(GENERATOR_UID), "the image's USER differs from runAsUser"


def test_hpa_scales_the_generator_deployment() -> None:
    deployment, _, container = generator()
    hpa = one("HorizontalPodAutoscaler", "textgen-generator")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; applying one resets it"
    metric_resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    for resource in metric_resources:
        assert resource in container["resources"]["requests"], f"utilization of {resource} needs a request"


def test_generator_serves_the_file_that_export_writes() -> None:
    """train (RayJob) -> export (Job) -> serve (Deployment, RayService): one path on one volume."""
    rayjob = one("RayJob", "textgen-train")
    args = train_args(rayjob)
    run_path = str(PurePosixPath(args["storage_path"]) / args["name"])

    job = one("Job", "textgen-export")
    export_pod = job["spec"]["template"]["spec"]
    export_argv = main_container(export_pod)["command"]
    assert export_argv[:2] == ["textgen", "export"]
    assert export_argv[2] == run_path, "export reads the run that the RayJob writes"
    out = flag(export_argv, "--out")
    written = resolve_path(export_pod, main_container(export_pod), out)
    assert written and written.volume_kind == "persistentVolumeClaim" and not written.read_only

    _, pod, container = generator()
    model = serve_argv_parser().parse_args(effective_argv(container, dockerfile_for(container["image"]))[2:]).model
    assert resolve_path(pod, container, model) == VolumeFile(
        "persistentVolumeClaim", written.claim, written.path_in_volume, True
    )
    for doc in docs_of_kind("RayService"):
        for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
            for group, ray_pod in pod_specs(doc):
                place = resolve_path(ray_pod, main_container(ray_pod), app["args"]["model_path"])
                assert place and (place.claim, place.path_in_volume) == (written.claim, written.path_in_volume), (
                    f"{doc['metadata']['name']}/{group}: model_path is not the exported file"
                )


def test_rayservice_runs_the_ray_serve_app() -> None:
    docs = docs_of_kind("RayService")
    if not docs:
        pytest.skip("no RayService in k8s/ (optional)")
    for doc in docs:
        (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        assert app["import_path"] == RAY_SERVE_IMPORT_PATH
        assert app["route_prefix"] == "/"
        assert app["args"]["model_path"].endswith(".onnx")


def test_rayservice_import_path_module_exists() -> None:
    if not docs_of_kind("RayService"):
        pytest.skip("no RayService in k8s/ (optional)")
    module = RAY_SERVE_IMPORT_PATH.split(":")[0]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"the RayService imports {module}: missing"


def parse_with_textgen_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    from textgen.cli import build_parser

    assert argv[0] == "textgen", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pass
    pytest.fail(f"textgen rejects {argv}:\n{capsys.readouterr().err}")


def test_export_job_command_parses_with_the_textgen_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = main_container(one("Job", "textgen-export")["spec"]["template"]["spec"])["command"]
    args = parse_with_textgen_cli(argv, capsys)
    assert args.out == flag(argv, "--out")


def test_generator_command_parses_with_the_textgen_cli(capsys: pytest.CaptureFixture[str]) -> None:
    serve_cli = pytest.importorskip("serve.cli")
    if not hasattr(serve_cli, "add_serve_args"):
        pytest.skip("serve/cli.py has no add_serve_args yet: `textgen serve` is not wired in")
    _, _, container = generator()
    args = parse_with_textgen_cli(effective_argv(container, dockerfile_for(container["image"])), capsys)
    assert args.port == GENERATOR_PORT


# ---------------------------------------------------------------------------------------------
# Security: Ray token auth, NetworkPolicies, hardened pods

RAY_TOKEN_SECRET = "textgen-ray-token"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects in the Secret
RAY_UID = 1000  # user ray of the rayproject/ray images
RAY_CONTROL_PORTS = (6379, 8265, 10001, 52365)  # GCS, dashboard/job API, Ray Client, dashboard agent
SERVE_PORT = 8000
NAMESPACE = "textgen"  # where the manifests are applied (any namespace: they name none)
OPERATOR_NAMESPACE = "ray-system"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}
RAY_CLIENT_LABELS = {"textgen/ray-client": "true"}


def submitter_template(doc: dict[str, Any]) -> dict[str, Any] | None:
    return doc["spec"].get("submitterPodTemplate") if doc["kind"] == "RayJob" else None


def ray_pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(role, labels the pod gets, pod spec) of every pod a KubeRay resource makes: head, workers,
    and a RayJob's submitter. KubeRay adds ray.io/node-type (not overridable) to head and workers."""
    found = []
    for name, group in ray_groups(doc):
        labels = dict(group["template"].get("metadata", {}).get("labels", {}))
        labels["ray.io/node-type"] = "head" if name == "head" else "worker"
        found.append((name, labels, group["template"]["spec"]))
    submitter = submitter_template(doc)
    if submitter is not None:
        found.append(("submitter", dict(submitter.get("metadata", {}).get("labels", {})), submitter["spec"]))
    return found


def ray_docs() -> list[dict[str, Any]]:
    docs = [d for _, d in all_docs() if _is_ray_kind(d)]
    assert docs, "no KubeRay resource in k8s/"
    return docs


def hardened_pods() -> list[tuple[str, dict[str, Any]]]:
    """Every pod that must carry the generator's securityContext: Ray pods and the export Job."""
    pods = [(f"{d['metadata']['name']}/{role}", spec) for d in ray_docs() for role, _, spec in ray_pod_templates(d)]
    pods += [(f"Job/{d['metadata']['name']}", spec) for d in docs_of_kind("Job") for _, spec in pod_specs(d)]
    return pods


def test_every_ray_container_uses_token_auth_from_the_secret() -> None:
    secrets = {d["metadata"]["name"]: d for d in docs_of_kind("Secret")}
    assert RAY_TOKEN_SECRET in secrets, f"Secret {RAY_TOKEN_SECRET} is not in k8s/"
    secret = secrets[RAY_TOKEN_SECRET]
    assert RAY_TOKEN_KEY in {**secret.get("stringData", {}), **secret.get("data", {})}
    for doc in ray_docs():
        name = doc["metadata"]["name"]
        # The operator itself calls the dashboard (job status, Serve config): it needs the token,
        # which it only knows through authOptions.
        assert ray_cluster_spec(doc).get("authOptions") == {"mode": "token", "secretName": RAY_TOKEN_SECRET}, (
            f"{name}: authOptions must be mode token with secretName {RAY_TOKEN_SECRET}"
        )
        if doc["kind"] == "RayJob":
            assert submitter_template(doc), f"{name}: no submitterPodTemplate, the submitter is not hardened"
        for role, _, pod in ray_pod_templates(doc):
            for container in containers(pod):
                where = f"{name}/{role}/{container['name']}"
                env = env_value_sources(container)
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
                token = env.get("RAY_AUTH_TOKEN", {})
                assert "value" not in token, f"{where}: RAY_AUTH_TOKEN written into the manifest"
                assert token.get("valueFrom", {}).get("secretKeyRef") == {
                    "name": RAY_TOKEN_SECRET,
                    "key": RAY_TOKEN_KEY,
                }, f"{where}: RAY_AUTH_TOKEN is not taken from Secret {RAY_TOKEN_SECRET}/{RAY_TOKEN_KEY}"
                assert "RAY_AUTH_TOKEN_PATH" not in env, f"{where}: RAY_AUTH_TOKEN_PATH would compete with the env"
                names = [e["name"] for e in container.get("env", [])]
                assert len(names) == len(set(names)), f"{where}: duplicate env names {names}"


def test_ray_token_secret_is_a_template() -> None:
    """No real token in the repository: the Secret holds a placeholder, created for real with openssl."""
    secret = one("Secret", RAY_TOKEN_SECRET)
    assert secret.get("type", "Opaque") == "Opaque"
    assert "data" not in secret and secret["stringData"] == {RAY_TOKEN_KEY: "REPLACE_ME"}
    text = (K8S_DIR / "secret.ray-token.yaml").read_text()
    assert "openssl rand -hex 32" in text


def test_crd_validation_catches_a_wrong_auth_mode() -> None:
    """Guard: the CRD schema knows authOptions and rejects modes Ray does not have."""
    rayjob = copy.deepcopy(one("RayJob", "textgen-train"))
    rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "Token"
    rayjob["spec"]["rayClusterSpec"]["authOptions"]["secret"] = RAY_TOKEN_SECRET
    errors = "\n".join(crd_errors(rayjob))
    assert "authOptions.mode: 'Token' is not one of" in errors
    assert "'secret' was unexpected" in errors


@pytest.mark.parametrize("where", [w for w, _ in hardened_pods()] + ["Deployment/textgen-generator"])
def test_pods_run_hardened(where: str) -> None:
    """Ray pods (head, workers, submitter) and the export Job: what the generator has -- non-root,
    RuntimeDefault seccomp, no privilege escalation, every capability dropped, no SA token."""
    pods = dict(hardened_pods())
    pods["Deployment/textgen-generator"] = generator()[1]
    pod = pods[where]
    pod_security = pod.get("securityContext", {})
    assert pod.get("automountServiceAccountToken") is False, f"{where}: the service-account token is mounted"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
    for container in containers(pod):
        security = container.get("securityContext", {})
        at = f"{where}/{container['name']}"

        def effective(key: str) -> Any:
            return security.get(key, pod_security.get(key))

        assert effective("runAsNonRoot") is True, f"{at}: runAsNonRoot"
        assert effective("runAsUser") not in (None, 0), f"{at}: no runAsUser (or root)"
        assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{at}: seccomp"
        assert security.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
        assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities not all dropped"
        assert not security.get("capabilities", {}).get("add"), f"{at}: adds capabilities"
        assert not security.get("privileged"), f"{at}: privileged"
        image = dockerfile_for(container["image"])
        users = [u.split(":")[0] for u in image.all("USER")]
        if image.all("FROM")[0].startswith("rayproject/ray:"):
            # The Ray images run as user ray; a USER line would have to keep it.
            assert effective("runAsUser") == RAY_UID, f"{at}: runAsUser is not the Ray images' uid {RAY_UID}"
            assert users in ([], ["ray"], [str(RAY_UID)]), f"{image.path.name} changes USER to {users}"


# NetworkPolicy semantics (networking.k8s.io/v1), enough to ask "may pod A reach pod B on port P?"


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions all hold ({} matches everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": lambda: labels.get(key) in values,
            "NotIn": lambda: key not in labels or labels[key] not in values,
            "Exists": lambda: key in labels,
            "DoesNotExist": lambda: key not in labels,
        }[op]()
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    name: str
    labels: tuple[tuple[str, str], ...]
    namespace: str = NAMESPACE

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def pod(name: str, labels: dict[str, str], namespace: str = NAMESPACE) -> Pod:
    return Pod(name, tuple(sorted(labels.items())), namespace)


def network_policies() -> list[dict[str, Any]]:
    return docs_of_kind("NetworkPolicy")


def isolating_policies(target: Pod) -> list[dict[str, Any]]:
    """The policies that select `target` for ingress (same namespace)."""
    return [
        p
        for p in network_policies()
        if target.namespace == NAMESPACE
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], target.label_map)
    ]


def peer_matches(peer: dict[str, Any], source: Pod) -> bool:
    if "ipBlock" in peer:
        # Pod IPs are inside any catch-all block; narrower blocks are taken as outside the cluster.
        return peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0")
    if "namespaceSelector" in peer:
        namespace_ok = selector_matches(peer["namespaceSelector"], source.namespace_labels)
    else:
        namespace_ok = source.namespace == NAMESPACE
    return namespace_ok and selector_matches(peer.get("podSelector", {}), source.label_map)


def port_matches(rule: dict[str, Any], port: int) -> bool:
    if not rule.get("ports"):
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        assert isinstance(entry["port"], int), f"named port {entry['port']}: use numbers (tests cannot resolve)"
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def admitted(source: Pod, target: Pod, port: int) -> bool:
    policies = isolating_policies(target)
    if not policies:
        return True  # not isolated: everything gets in
    return any(
        (not rule.get("from") or any(peer_matches(peer, source) for peer in rule["from"])) and port_matches(rule, port)
        for p in policies
        for rule in p["spec"].get("ingress", [])
    )


def ray_cluster_pods(doc: dict[str, Any]) -> dict[str, Pod]:
    """Role -> Pod for a KubeRay resource's head, workers (by group name) and submitter."""
    name = doc["metadata"]["name"]
    return {role: pod(f"{name}/{role}", labels) for role, labels, _ in ray_pod_templates(doc)}


def outsiders() -> list[Pod]:
    """Pods that must not reach any Ray cluster's control plane: anything else in the namespace."""
    deployment, _, _ = generator()
    found = [
        pod("unlabelled", {}),
        pod("random app", {"app": "intruder"}),
        pod("generator", deployment["spec"]["template"]["metadata"]["labels"]),
        pod("other namespace", {}, "elsewhere"),
        pod("ray client elsewhere", RAY_CLIENT_LABELS, "elsewhere"),
    ]
    for job in docs_of_kind("Job"):
        found.append(pod(f"Job/{job['metadata']['name']}", job["spec"]["template"]["metadata"]["labels"]))
    return found


def test_network_policies_select_every_ray_pod() -> None:
    assert network_policies(), "no NetworkPolicy in k8s/"
    for doc in ray_docs():
        for role, ray_pod in ray_cluster_pods(doc).items():
            assert isolating_policies(ray_pod), f"{ray_pod.name}: no NetworkPolicy isolates it (open to all pods)"
    for policy in network_policies():
        selected = [
            p
            for d in ray_docs()
            for p in ray_cluster_pods(d).values()
            if selector_matches(policy["spec"]["podSelector"], p.label_map)
        ]
        assert selected, f"NetworkPolicy {policy['metadata']['name']} selects no pod of the manifests (a typo?)"


def test_network_policy_rules_never_open_a_ray_pod_to_everyone() -> None:
    """No rule without `from`, and no match-all peer, except Serve's port on a RayService."""
    for doc in ray_docs():
        serve = doc["kind"] == "RayService"
        for ray_pod in ray_cluster_pods(doc).values():
            for policy in isolating_policies(ray_pod):
                for rule in policy["spec"].get("ingress", []):
                    where = f"{policy['metadata']['name']} (selects {ray_pod.name})"
                    assert rule.get("from"), f"{where}: an ingress rule without `from` admits every source"
                    ports = {p.get("port") for p in rule.get("ports", [])}
                    for peer in rule["from"]:
                        everyone = peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0") or (
                            not peer.get("podSelector") and "ipBlock" not in peer
                        )
                        if everyone:
                            assert serve and ports == {SERVE_PORT}, (
                                f"{where}: peer {peer} admits every pod on {ports or 'all ports'}"
                            )


def test_only_what_must_reach_the_head_does() -> None:
    docs = ray_docs()
    operator = pod("kuberay-operator", OPERATOR_LABELS, OPERATOR_NAMESPACE)
    client = pod("ray client", RAY_CLIENT_LABELS)
    for doc in docs:
        name, pods = doc["metadata"]["name"], ray_cluster_pods(doc)
        head = pods["head"]
        workers = [p for role, p in pods.items() if role not in ("head", "submitter")]
        nodes = [head, *workers]
        # The cluster's own pods: every port (Ray's raylet, object manager and worker ports are random).
        for a in nodes:
            for b in nodes:
                for port in (*RAY_CONTROL_PORTS, 12345, 45678):
                    assert admitted(a, b, port), f"{name}: {a.name} cannot reach {b.name}:{port}"
        # The job API from the submitter, the operator and labelled clients; nothing else of theirs.
        if "submitter" in pods:
            assert admitted(pods["submitter"], head, 8265), f"{name}: the submitter cannot reach the job API"
            for port in (6379, 10001, 12345):
                assert not admitted(pods["submitter"], head, port), f"{name}: submitter reaches head:{port}"
            for worker in workers:
                assert not admitted(pods["submitter"], worker, 12345), f"{name}: submitter reaches {worker.name}"
        assert admitted(operator, head, 8265), f"{name}: the KubeRay operator cannot reach the dashboard"
        assert admitted(client, head, 8265) and admitted(client, head, 10001), f"{name}: labelled clients blocked"
        for port in (6379, 52365, 12345):
            assert not admitted(operator, head, port), f"{name}: the operator reaches head:{port}"
            assert not admitted(client, head, port), f"{name}: a labelled client reaches head:{port}"
        # Everyone else: other Ray clusters' pods, the generator, the export Job, unlabelled pods.
        strangers = outsiders() + [p for other in docs if other is not doc for p in ray_cluster_pods(other).values()]
        for stranger in strangers:
            for target in nodes:
                for port in (*RAY_CONTROL_PORTS, 12345):
                    assert not admitted(stranger, target, port), f"{stranger.name} reaches {target.name}:{port}"
        if doc["kind"] == "RayService":
            for target in nodes:
                assert admitted(pod("any pod", {"app": "web"}), target, SERVE_PORT), f"{target.name}: Serve blocked"
                assert not admitted(pod("outside", {}, "elsewhere"), target, SERVE_PORT), target.name
        else:
            for target in nodes:
                assert not admitted(pod("any pod", {"app": "web"}), target, SERVE_PORT), target.name


def test_ray_pod_labels_do_not_leak_into_the_generator_selectors() -> None:
    """The Ray pods' labels must not make the generator's Service, Deployment or PDB pick them up."""
    deployment, _, _ = generator()
    selectors = [
        deployment["spec"]["selector"],
        {"matchLabels": one("Service", "textgen-generator")["spec"]["selector"]},
    ]
    selectors += [pdb["spec"]["selector"] for pdb in docs_of_kind("PodDisruptionBudget")]
    for doc in ray_docs():
        for ray_pod in ray_cluster_pods(doc).values():
            for selector in selectors:
                assert not selector_matches(selector, ray_pod.label_map), f"{selector} selects {ray_pod.name}"


def test_core_validation_catches_a_misspelt_network_policy_field() -> None:
    """Guard: NetworkPolicies go through the strict core validation above."""
    assert any(d["kind"] == "NetworkPolicy" for _, d in all_docs())
    policy = copy.deepcopy(network_policies()[0])
    policy["spec"]["podSelectors"] = policy["spec"].pop("podSelector")
    with pytest.raises(kubernetes_validate.ValidationError, match="podSelector"):
        kubernetes_validate.validate(policy, K8S_VERSIONS[0], strict=True)


def test_readme_explains_the_security_setup() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    assert "## Security" in readme
    for needle in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", RAY_TOKEN_SECRET, "openssl rand -hex 32", "ray job submit"):
        assert needle in readme, f"k8s/README.md, Security: {needle} is not explained"


# ---------------------------------------------------------------------------------------------
# Images


def test_every_image_is_built_by_a_dockerfile() -> None:
    version = pyproject()["project"]["version"]
    built = {d.image: d for d in dockerfiles()}
    assert {"ghcr.io/textgen/textgen-train:0.1.0", "ghcr.io/textgen/textgen-generator:0.1.0"} <= built.keys()
    for image in built:
        assert image.rsplit(":", 1)[1] == version, f"{image}: tag differs from the project version {version}"
    used = {image for _, doc in all_docs() for image in walk_images(doc)}
    assert used, "no image in k8s/"
    assert used <= built.keys(), f"images no Dockerfile builds: {sorted(used - built.keys())}"


def test_ray_version_matches_images_and_pin() -> None:
    pins = [r for r in pyproject()["project"]["optional-dependencies"]["trainer"] if requirement_name(r) == "ray"]
    ray_version = re.search(r"==([\w.]+)", pins[0]).group(1)
    ray_docs = [d for _, d in all_docs() if _is_ray_kind(d)]
    assert ray_docs
    for doc in ray_docs:
        assert ray_cluster_spec(doc)["rayVersion"] == ray_version, doc["metadata"]["name"]
        for image in set(walk_images(doc)):
            (base,) = dockerfile_for(image).all("FROM")
            assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version)}-py311(-\w+)?", base), (
                f"{image} is built FROM {base}, not Ray {ray_version}"
            )


def test_train_image_installs_the_gpu_stack() -> None:
    train = dockerfile_for("ghcr.io/textgen/textgen-train:0.1.0")
    (base,) = train.all("FROM")
    assert base.endswith("-gpu"), f"training image built FROM {base}, not a GPU image"
    assert "gpu" in train.pip_extras()
    assert "tensorflow" in resolved_requirements({"gpu"}) and "tf2onnx" in resolved_requirements({"gpu"})
    assert all("-c requirements/constraints.txt" in r for r in train.all("RUN") if "pip install" in r)


@pytest.mark.parametrize(
    "image", ["ghcr.io/textgen/textgen-generator:0.1.0", "ghcr.io/textgen/textgen-rayserve:0.1.0"]
)
def test_serving_images_carry_no_training_stack(image: str) -> None:
    built = {d.image for d in dockerfiles()}
    if image not in built:
        pytest.skip(f"{image} is not built here")
    dockerfile = dockerfile_for(image)
    extras = dockerfile.pip_extras()
    assert extras and not extras & {"train", "gpu"}, f"{dockerfile.path.name} installs extras {extras}"
    instructions = " ".join(args for _, args in dockerfile.instructions).lower()
    assert "tensorflow" not in instructions and "tf2onnx" not in instructions
    forbidden = set(TRAINING_STACK) - ({"ray"} if "rayserve" in extras else set())
    installed = resolved_requirements(extras)
    assert not installed & forbidden, f"{dockerfile.path.name} pulls in {sorted(installed & forbidden)}"


def test_generator_image_can_bake_the_model() -> None:
    generator_file = dockerfile_for("ghcr.io/textgen/textgen-generator:0.1.0")
    stages = generator_file.all("FROM")
    assert "runtime AS with-model" in stages, "no with-model stage to bake model.onnx into the image"
    assert not stages[-1].endswith("with-model"), "the default (last) stage must not need model.onnx"
    copies = [c for c in generator_file.all("COPY") if "model.onnx" in c]
    assert copies and copies[0].split()[-1] == "/models/model.onnx"
    assert serve_argv_parser().parse_args(generator_file.exec_form("CMD")).model == "/models/model.onnx"


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [l for l in lines if l and not l.startswith("#")]
    for excluded in (".git", ".venv", "runs", "tests"):
        assert excluded in patterns, f".dockerignore does not exclude {excluded}"
    assert "**/*.onnx" in patterns and "!model.onnx" in patterns
    assert patterns.index("**/*.onnx") < patterns.index("!model.onnx"), "the exception must follow the rule"


def test_readme_covers_every_manifest_and_dockerfile() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    for path in MANIFEST_FILES + [d.path for d in dockerfiles()]:
        assert path.name in readme, f"k8s/README.md does not mention {path.name}"
    assert "textgen export" in readme and "/mnt/textgen/models/model.onnx" in readme


def test_rayjob_data_is_prepared_where_every_worker_reads_it() -> None:
    """A RayJob that trains with a local --data has an initContainer running `textgen prepare
    --out` that same directory, on the volume every Ray pod mounts there (the workers memory-map it)."""
    from textgen.cli import build_parser as textgen_parser

    for doc in rayjobs():
        data, name = flag(rayjob_argv(doc), "--data"), doc["metadata"]["name"]
        if data is None or "://" in data:
            continue
        preparing = [(group, pod, c) for group, pod in pod_specs(doc) for c in pod.get("initContainers", [])
                     if c.get("command", [])[:4] == ["python", "-m", "textgen", "prepare"]]
        assert preparing, f"{name}: --data {data} but no initContainer runs textgen prepare"
        group, pod, init = preparing[0]
        args = textgen_parser().parse_args(init["command"][3:])
        assert args.out == data, f"{name}/{group}: prepare writes {args.out}, training reads {data}"
        written = resolve_path(pod, init, data)
        assert written and written.volume_kind == "persistentVolumeClaim" and not written.read_only
        for other, other_pod in pod_specs(doc):
            seen = resolve_path(other_pod, main_container(other_pod), data)
            assert seen == written, f"{name}/{other}: {data} is not the volume prepare writes"

"""A Kubernetes pod run as the kubelet would run it, with local processes instead of images (tests/test_deploy.py).

No cluster and no container engine run here, so this does their part with the kernel's own tools, as root:
- the pod's network: one network namespace (a "pause" process holds it) with loopback and a veth pair to this
  machine, so that the pod has an address of its own (`Pod.ip`); what listens on the pod's 127.0.0.1 is
  reachable only from inside it, as in a cluster;
- each container: its own mount namespace and a root file system of its own (chroot), built from the image's
  files (`Image`) and this machine's /usr and /etc mounted read-only (the software an image would carry, with
  more of this machine's folders where the image needs them, at the image's own paths); the manifest's
  volumeMounts bound at their mountPath (subPath, readOnly); with readOnlyRootFilesystem the root is
  remounted read-only, so only the mounted paths can be written;
- volumes as the kubelet makes them: an emptyDir is a directory of mode 0777, a configMap or secret volume
  holds its keys as files of defaultMode (0644 unless set); with fsGroup, every volume is given that group and
  the group bits the kubelet adds (rw for writable volumes, r for configMaps and secrets, setgid on folders);
- the container's process: the manifest's command and args (or the image's entrypoint and cmd), its env with
  secretKeyRef and configMapKeyRef resolved, the image's working directory, run under setpriv with the uid,
  gid and supplementary groups the kubelet gives (runAsUser/runAsGroup of the container, else the pod's, else
  the image's user; fsGroup and supplementalGroups as groups), no new privileges and no capabilities when the
  manifest drops them; its stdout and stderr belong to its user, as runc makes them;
- probes: exec probes run in the container's namespaces, root and user; httpGet probes are sent to the pod's
  address from outside the pod, as the kubelet sends them.

Native sidecars (initContainers with restartPolicy Always) start first, in order, each once its startup has
passed (here: once it runs), then the containers. Restarting a container keeps the pod's volumes, as the
kubelet does. Everything is stopped by process id; the veth disappears with the pod's network namespace.
"""

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from torchserve_instance import stop_process_group

HOST_SOFTWARE = ("/usr", "/etc")  # bound read-only into every container's root, as an image's layers would be
MERGED_USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KUBELET_RW_MASK, KUBELET_RO_MASK = 0o660, 0o440


@dataclass
class Image:
    """What a container image gives a container: entrypoint, cmd, working directory, environment, default
    user, and its files. `files`: path in the image -> a host file or folder to copy, text to write, or None
    for an empty folder; `owners`: path -> uid of the image's own files that are not root's; `host_binds`:
    host paths bound read-only at the same path (beside /usr and /etc); `binds`: path in the image -> host
    folder bound read-only there; `overlays`: path in the image -> host folder whose copy, with the image's
    `files` under that path, the image has there instead of what is bound; `links`: symbolic links."""
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    user: int = 0
    files: dict[str, object] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)
    host_binds: tuple[str, ...] = ()
    binds: dict[str, str] = field(default_factory=dict)
    overlays: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


class Container:
    """One container of the pod: its root file system, its process, its log."""

    def __init__(self, pod: "Pod", spec: dict):
        self.pod, self.spec, self.name = pod, spec, spec["name"]
        self.image = pod.images[spec["image"]]
        self.dir = pod.root / "containers" / self.name
        self.rootfs = self.dir / "rootfs"
        self.log_path = pod.root / "logs" / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.restarts = -1

    # --- what the kubelet derives from the manifest ---
    def security(self, key: str, default=None):
        own = self.spec.get("securityContext", {})
        return own[key] if key in own else self.pod.spec.get("securityContext", {}).get(key, default)

    @property
    def uid(self) -> int:
        return int(self.security("runAsUser", self.image.user))

    @property
    def gid(self) -> int:
        return int(self.security("runAsGroup", 0))

    @property
    def groups(self) -> list[int]:
        pod = self.pod.spec.get("securityContext", {})
        return sorted({int(g) for g in [pod.get("fsGroup"), *pod.get("supplementalGroups", [])] if g is not None})

    def environment(self) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": self.pod.name, "HOME": self.image.env.get("HOME", "/"),
               **self.image.env}
        for item in self.spec.get("env", []):
            value = self.pod.env_value(item)
            if value is not None:
                env[item["name"]] = value
        return env

    def argv(self) -> list[str]:
        command = self.spec.get("command", self.image.entrypoint)
        args = self.spec.get("args", self.image.cmd if "command" not in self.spec else [])
        return [*command, *args]

    def user_switch(self) -> list[str]:
        """setpriv as the kubelet and runc would switch to the container's user."""
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        switch = ["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), *groups]
        if self.security("allowPrivilegeEscalation") is False:
            switch.append("--no-new-privs")
        if "ALL" in self.security("capabilities", {}).get("drop", []):
            switch += ["--inh-caps=-all", "--bounding-set=-all"]
        return switch

    # --- the root file system ---
    def build_rootfs(self) -> None:
        if self.rootfs.exists():
            return  # a restart: the same image layer
        self.rootfs.mkdir(parents=True)
        for name, target in MERGED_USR_LINKS.items():
            os.symlink(target, self.rootfs / name)
        for path in ("proc", "dev", "sys", "tmp", *[p.lstrip("/") for p in HOST_SOFTWARE + self.image.host_binds],
                     *[p.lstrip("/") for p in self.image.binds]):
            (self.rootfs / path).mkdir(parents=True, exist_ok=True)
        (self.rootfs / "tmp").chmod(0o1777)
        for overlay, source in self.image.overlays.items():
            shutil.copytree(source, self.layer_path(overlay), symlinks=True)
        for path, source in self.image.files.items():
            self.place(path, source)
        for path, target in self.image.links.items():
            self.layer_path(path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, self.layer_path(path))
        for path, uid in self.image.owners.items():
            os.chown(self.layer_path(path), uid, uid)
        for mount in self.spec.get("volumeMounts", []):
            source = self.pod.volume_source(mount)
            target = self.layer_path(mount["mountPath"])
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)

    def layer_path(self, path: str) -> Path:
        """Where an image path lives on this machine: in an overlay's copy, or in the root's own layer."""
        for overlay in self.image.overlays:
            if path == overlay or path.startswith(overlay.rstrip("/") + "/"):
                return self.dir / "overlays" / path.lstrip("/")
        return self.rootfs / path.lstrip("/")

    def place(self, path: str, source) -> None:
        target = self.layer_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            target.mkdir(exist_ok=True)
        elif isinstance(source, Path) and source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif isinstance(source, Path):
            shutil.copy2(source, target)
        elif isinstance(source, tuple):  # (text, mode)
            target.write_text(source[0])
            target.chmod(source[1])
        else:
            target.write_text(source)
        for parent in [target, *target.parents]:
            if parent == self.dir:
                break
            if parent.is_dir():
                parent.chmod(parent.stat().st_mode | 0o755)

    def mount_script(self) -> str:
        """The shell commands, run as root in the container's new mount namespace, that build its root."""
        root = shlex.quote(str(self.rootfs))
        lines = ["set -e", f"mount --bind {root} {root}"]
        binds = {path: path for path in HOST_SOFTWARE + self.image.host_binds} | self.image.binds
        for path, source in binds.items():
            lines += [f"mount --bind {shlex.quote(source)} {root}{path}", f"mount -o remount,bind,ro {root}{path}"]
        for overlay in self.image.overlays:
            lines += [f"mount --bind {shlex.quote(str(self.layer_path(overlay)))} {root}{overlay}"]
        lines += [f"mount --rbind /{path} {root}/{path}" for path in ("proc", "dev", "sys")]
        for mount in self.spec.get("volumeMounts", []):
            source, target = shlex.quote(str(self.pod.volume_source(mount))), f"{root}{mount['mountPath']}"
            lines.append(f"mount --bind {source} {target}")
            if mount.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {target}")
        if self.security("readOnlyRootFilesystem"):
            lines.append(f"mount -o remount,bind,ro {root}")
            lines += [f"mount -o remount,bind,ro {root}{overlay}" for overlay in self.image.overlays]
        return "\n".join(lines)

    def in_container(self, argv: list[str]) -> list[str]:
        """`argv` as the container's user, with its environment, in its working directory."""
        env = [f"{key}={value}" for key, value in self.environment().items()]
        workdir = self.spec.get("workingDir", self.image.workdir)
        return [*self.user_switch(), "env", "-i", *env, "sh", "-c", 'cd "$0" && exec "$@"', workdir, *argv]

    # --- life cycle ---
    def start(self) -> None:
        self.build_rootfs()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        os.chown(self.log_path, self.uid, self.gid)  # runc gives the container's user its stdio
        script = self.mount_script() + "\nexec chroot " + shlex.quote(str(self.rootfs)) + ' "$@"'
        command = ["nsenter", f"--net=/proc/{self.pod.pause_pid}/ns/net", "unshare", "--mount",
                   "--propagation", "private", "--fork", "--kill-child", "sh", "-c", script, "container",
                   *self.in_container(self.argv())]
        with log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.restarts += 1

    @property
    def pid(self) -> int:
        """The container's first process (the child of unshare, inside the new namespaces)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = _children(self.process.pid)
            if found:
                return found[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"container {self.name} exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"container {self.name} did not start")

    def wait_started(self) -> bool:
        """Wait for the container's first process; False where it exited first (a crash, which the kubelet
        records as the container's status: its log says why)."""
        try:
            self.pid
        except RuntimeError:
            return False
        return True

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 15) -> None:
        if self.process is None:
            return
        stop_process_group(self.process, grace)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def exec(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """`kubectl exec`: in the container's mount and network namespaces, root, user and environment."""
        command = ["nsenter", "-t", str(self.pid), "--mount", "--net", "--root", *self.in_container(argv)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def probe(self, kind: str) -> bool:
        """One try of the container's `kind` probe (readinessProbe, livenessProbe, startupProbe)."""
        probe = self.spec[kind]
        timeout = probe.get("timeoutSeconds", 1)
        if "exec" in probe:
            try:
                return self.exec(probe["exec"]["command"], timeout=timeout + 5).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        get = probe["httpGet"]
        try:
            answer = requests.get(self.pod.url(self.port(get["port"]), get["path"]), timeout=timeout)
        except requests.RequestException:
            return False
        return 200 <= answer.status_code < 400

    def port(self, port) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in self.spec.get("ports", []) if p.get("name") == port)

    def wait_for(self, kind: str, timeout: float) -> None:
        """Until the probe passes (bounded), as the kubelet tries it every periodSeconds (here more often)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"container {self.name} exited with {self.process.returncode}:\n{self.log()}")
            if self.probe(kind):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}'s {kind} did not pass within {timeout:.0f} s:\n{self.log()}")

    def log(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Pod:
    """The pod of a PodSpec (`spec`), with `images` by image name and the ConfigMaps' and Secrets' data by name.
    Its files live under `root`, which must be reachable by the containers' users (mode 0755 up to /)."""

    def __init__(self, spec: dict, images: dict[str, Image], config_maps: dict[str, dict[str, str]],
                 secrets: dict[str, dict[str, str]], root: Path, name: str = "pod"):
        self.spec, self.images, self.config_maps, self.secrets = spec, images, config_maps, secrets
        self.root, self.name = Path(root), name
        self.pause: subprocess.Popen | None = None
        self.pause_pid: int | None = None
        tag = f"{os.getpid() % 10000}{threading.get_ident() % 100:02d}"
        self.veth = f"pod{tag}"  # at most 15 characters
        subnet = (os.getpid() % 250, (threading.get_ident() // 7) % 62 * 4)
        self.host_ip, self.ip = (f"10.254.{subnet[0]}.{subnet[1] + n}" for n in (1, 2))
        sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        self.containers = {c["name"]: Container(self, c) for c in sidecars + spec["containers"]}

    def url(self, port: int, path: str = "") -> str:
        return f"http://{self.ip}:{port}{path}"

    # --- volumes ---
    def env_value(self, item: dict) -> str | None:
        """An env entry's value, or None where it names an optional Secret or ConfigMap (or key) that does not
        exist: the kubelet then leaves the variable unset."""
        if "value" in item:
            return str(item["value"])
        source = item["valueFrom"]
        kind, ref = (("secretKeyRef", self.secrets) if "secretKeyRef" in source
                     else ("configMapKeyRef", self.config_maps))
        reference = source[kind]
        value = ref.get(reference["name"], {}).get(reference["key"])
        if value is None and not reference.get("optional", False):
            raise KeyError(f"{kind} {reference['name']}/{reference['key']} is not in the pod's objects")
        return value

    def volume_dir(self, name: str) -> Path:
        """Where a volume's files are: a hostPath's own path, else a folder of the pod's."""
        volume = next(v for v in self.spec.get("volumes", []) if v["name"] == name)
        return Path(volume["hostPath"]["path"]) if "hostPath" in volume else self.root / "volumes" / name

    def volume_source(self, mount: dict) -> Path:
        base = self.volume_dir(mount["name"])
        return base / mount["subPath"] if mount.get("subPath") else base

    def make_volumes(self) -> None:
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        for volume in self.spec.get("volumes", []):
            if "hostPath" in volume:
                continue  # the node's own folder, as it is
            path = self.volume_dir(volume["name"])
            path.mkdir(parents=True)
            if "emptyDir" in volume:
                path.chmod(0o777)
                read_only = False
            else:
                source = volume.get("configMap") or volume.get("secret")
                data = (self.config_maps if "configMap" in volume else self.secrets)[
                    source.get("name") or source["secretName"]]
                mode = source.get("defaultMode", 0o644)
                for key, text in data.items():
                    (path / key).write_text(text)
                    (path / key).chmod(mode)
                path.chmod(0o755)
                read_only = True
            if fs_group is not None:
                _give_group(path, int(fs_group), read_only)

    # --- network ---
    def make_network(self) -> None:
        self.pause = subprocess.Popen(["unshare", "--net", "--fork", "--kill-child", "sleep", "infinity"],
                                      start_new_session=True)
        deadline = time.monotonic() + 10
        while self.pause_pid is None:
            found = _children(self.pause.pid)
            if found:
                self.pause_pid = found[0]
            elif time.monotonic() > deadline:
                raise TimeoutError("the pod's network namespace did not come up")
            else:
                time.sleep(0.02)
        inside = ["nsenter", "-t", str(self.pause_pid), "-n"]
        for command in (
            ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.pause_pid)],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth],
            ["ip", "link", "set", self.veth, "up"],
            [*inside, "ip", "addr", "add", f"{self.ip}/30", "dev", "eth0"],
            [*inside, "ip", "link", "set", "eth0", "up"],
            [*inside, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=10)

    # --- life cycle ---
    def start(self) -> "Pod":
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in [self.root, *self.root.parents]:
            if not folder.stat().st_mode & 0o001:
                raise PermissionError(f"{folder} cannot be traversed by the containers' users")
        self.make_volumes()
        self.make_network()
        for container in self.containers.values():
            container.start()
            if container.running():
                container.wait_started()  # the kubelet's sidecar startup: the next one may begin
        return self

    def stop(self) -> None:
        for container in reversed(list(self.containers.values())):
            container.stop()
        if self.pause is not None:
            os.killpg(self.pause.pid, signal.SIGKILL)
            self.pause.wait(timeout=10)
            subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=10)  # gone already
            self.pause = None

    def __enter__(self):
        try:
            return self.start()
        except Exception:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # it has ended
        return []


def _give_group(path: Path, group: int, read_only: bool) -> None:
    """The kubelet's volume ownership for fsGroup: the group, its read (and write) bits, setgid on folders."""
    mask = KUBELET_RO_MASK if read_only else KUBELET_RW_MASK
    for item in [path, *path.rglob("*")]:
        os.chown(item, -1, group, follow_symlinks=False)
        extra = mask | 0o2110 if item.is_dir() else mask
        item.chmod(item.stat().st_mode | extra)


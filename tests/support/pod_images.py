"""The two images of deploy/k8s and deploy/kserve as tests/support/pod_harness.py runs them, built from this machine's
software (no image can be pulled here):

- ours (deploy/Dockerfile): its final stage's ENTRYPOINT, WORKDIR, ENV and the files it copies to
  /home/model-server (config.properties, metrics.yaml, torchserve_probe.py, model-store/style_transfer.mar from
  the test's random-weights archive), run/ and tmp/ owned by uid 1000 as its RUN makes them, user 1000. Its
  Python environment is the repository's .venv (built from the same requirements.txt), bound read-only where
  the image has its own (its VIRTUAL_ENV, /opt/style-transfer/venv), so that no volume of the pod can hide it
  wherever the repository lies, its scripts' interpreter lines pointing there as the image's do; and the
  Python it was made from, bound where it lives;
- nginxinc/nginx-unprivileged: Debian's nginx instead of the image's Alpine build, with the image's behaviour:
  user 101, its nginx.conf (pid file and temporary files in /tmp, the server blocks of /etc/nginx/conf.d), logs
  to the container's stdout and stderr, and its entrypoint, which sources the readable *.envsh and runs the
  executable *.sh of /docker-entrypoint.d in order, the image's template step among them (every
  /etc/nginx/templates/*.template through envsubst, for the variables that are set, into /etc/nginx/conf.d).
"""

import json
import os
import re
from pathlib import Path

from pod_harness import Image

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NGINX_IMAGE = "nginxinc/nginx-unprivileged"
OUR_IMAGE = "registry.example.com/style-transfer"

NGINX_CONF = """\
worker_processes auto;
error_log /var/log/nginx/error.log notice;
pid /tmp/nginx.pid;
events {
    worker_connections 1024;
}
http {
    proxy_temp_path /tmp/proxy_temp;
    client_body_temp_path /tmp/client_temp;
    fastcgi_temp_path /tmp/fastcgi_temp;
    uwsgi_temp_path /tmp/uwsgi_temp;
    scgi_temp_path /tmp/scgi_temp;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /var/log/nginx/access.log;
    sendfile on;
    keepalive_timeout 65;
    include /etc/nginx/conf.d/*.conf;
}
"""

# What the image's entrypoint does before it runs nginx (written here from its documented behaviour).
NGINX_ENTRYPOINT = """\
#!/bin/sh
set -e
if [ "$1" = nginx ]; then
    for f in $(find /docker-entrypoint.d/ -follow -type f | sort -V); do
        case "$f" in
            *.envsh) if [ -r "$f" ]; then echo "$0: sourcing $f"; . "$f"; else echo "$0: $f not readable"; fi ;;
            *.sh) if [ -x "$f" ]; then echo "$0: running $f"; "$f"; else echo "$0: ignoring $f, not executable"; fi ;;
        esac
    done
fi
exec "$@"
"""

NGINX_TEMPLATES = """\
#!/bin/sh
set -e
templates=/etc/nginx/templates
output=/etc/nginx/conf.d
[ -d "$templates" ] || exit 0
if [ ! -w "$output" ]; then
    echo "$0: ERROR: $templates exists, but $output is not writable"
    exit 0
fi
names=$(env | sed -n 's/^\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/${\\1}/p' | tr '\\n' ' ')
for template in $(find "$templates" -follow -type f -name '*.template'); do
    name=${template#"$templates/"}
    echo "$0: envsubst $template to $output/${name%.template}"
    envsubst "$names" < "$template" > "$output/${name%.template}"
done
"""


def nginx_image() -> Image:
    return Image(
        entrypoint=["/docker-entrypoint.sh"], cmd=["nginx", "-g", "daemon off;"], user=101,
        files={"/etc/nginx/nginx.conf": NGINX_CONF, "/etc/nginx/conf.d": None,
               "/docker-entrypoint.sh": (NGINX_ENTRYPOINT, 0o755),
               "/docker-entrypoint.d/20-envsubst-on-templates.sh": (NGINX_TEMPLATES, 0o755),
               "/var/cache/nginx": None, "/var/log/nginx": None},
        owners={"/var/cache/nginx": 101},
        overlays={"/etc/nginx": "/etc/nginx"},
        links={"/var/log/nginx/error.log": "/dev/stderr", "/var/log/nginx/access.log": "/dev/stdout"})


def dockerfile_final_stage() -> dict:
    """ENTRYPOINT, WORKDIR and ENV of deploy/Dockerfile's last stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stage = text.rsplit("\nFROM ", 1)[1]
    found = {"env": {}}
    for line in stage.splitlines():
        instruction, _, rest = line.partition(" ")
        if instruction == "ENTRYPOINT":
            found["entrypoint"] = json.loads(rest)
        elif instruction == "WORKDIR":
            found["workdir"] = rest.strip()
        elif instruction == "ENV":
            found["env"].update(re.findall(r"(\w+)=(\S+)", rest))
    return found


def our_image(mar: Path) -> Image:
    venv, image_venv = ROOT / ".venv", dockerfile_virtual_env()
    python_home = Path(os.path.realpath(venv / "bin" / "python3")).parents[1]
    stage = dockerfile_final_stage()
    home = "/home/model-server"
    return Image(
        entrypoint=stage["entrypoint"], workdir=stage["workdir"], user=1000,
        env={**stage["env"], "HOME": home,
             "PATH": f"{image_venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"},
        files={f"{home}/config.properties": ROOT / "deploy" / "config.properties",
               f"{home}/metrics.yaml": ROOT / "metrics.yaml",
               f"{home}/torchserve_probe.py": ROOT / "deploy" / "torchserve_probe.py",
               f"{home}/model-store/style_transfer.mar": mar,
               f"{home}/run": None, f"{home}/tmp": None, **relocated_scripts(venv, image_venv)},
        owners={f"{home}/run": 1000, f"{home}/tmp": 1000},
        binds={image_venv: os.path.realpath(venv)}, overlays={f"{image_venv}/bin": str(venv / "bin")},
        host_binds=(str(python_home),))


def dockerfile_virtual_env() -> str:
    """Where deploy/Dockerfile puts its Python environment (its runtime stage's VIRTUAL_ENV)."""
    return re.search(r"\bVIRTUAL_ENV=(\S+)", DOCKERFILE.read_text()).group(1)


def relocated_scripts(venv: Path, to: str) -> dict[str, tuple[str, int]]:
    """The scripts of `venv`/bin that name its Python in their first lines, as an environment made at `to` has
    them: those lines name `to`'s Python instead. pip writes a plain #! line, or, for a path with a space, a
    /bin/sh line and a line that execs the Python by its quoted path."""
    pythons = sorted({f"{venv}/bin/python", f"{os.path.realpath(venv)}/bin/python"}, key=len, reverse=True)
    scripts = {}
    for script in sorted((venv / "bin").iterdir()):
        if script.is_symlink() or not script.is_file() or script.read_bytes()[:2] != b"#!":
            continue
        lines = script.read_text(errors="surrogateescape").split("\n")
        head = "\n".join(lines[:3])
        if any(python in head for python in pythons):
            for python in pythons:
                head = head.replace(python, f"{to}/bin/python")
            scripts[f"{to}/bin/{script.name}"] = ("\n".join([head, *lines[3:]]), 0o755)
    return scripts


def images_for(spec: dict, mar: Path) -> dict[str, Image]:
    """The image of every container of a PodSpec, by its image name."""
    images = {}
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = container["image"]
        if name.startswith(NGINX_IMAGE + ":"):
            images[name] = nginx_image()
        elif name.startswith(OUR_IMAGE + ":"):
            images[name] = our_image(mar)
        else:
            raise ValueError(f"no image for {name} in tests/support/pod_images.py")
    return images

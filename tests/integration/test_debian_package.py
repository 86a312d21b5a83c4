"""The Debian package (packaging/debian/): built by scripts/build-deb.sh (what `make deb` runs) into a temporary
directory, checked with lintian and dpkg-deb, then installed with dpkg into a minimal Debian 12 root made by
debootstrap (minbase plus what the package depends on), where maintainer scripts run and where the installed
/usr/bin/fleetprov runs chrooted, as the user fleetprov, with the root's python3.11 and the bundled packages:
`--version`, the template configuration refused, `--once` against the emulator (which runs from the source tree,
outside the root), `run` provisioning anew through its child process, an upgrade, a removal and a purge.

Needs root (chroot, and files owned by the root's fleetprov user), the network (PyPI for the bundled wheels,
a Debian mirror for debootstrap) and the Debian packages in the Makefile's DEB_PACKAGES. Without them it fails
and says why; it never skips. Cost on the 2-core development machine: about 2 minutes from scratch (debootstrap,
80-140 s, runs while the package builds, ~40 s; then lintian, ~10-15 s, and the installs, ~15 s). The finished
root is kept as a tarball under $XDG_CACHE_HOME/fleetprov-tests (~/.cache) for a week; with it, about 65 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetprov import __version__
from tests.support import Emulator, device_config

pytestmark = pytest.mark.timeout(900)

SOURCE = Path(__file__).resolve().parents[2]
TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb", "lintian", "debootstrap", "chroot", "tar", "python3.11")
# The root: Debian 12's minbase and what the package depends on, nothing more, so that a dependency the
# package needs but does not declare shows up here. (libc6 and libgcc-s1 are in minbase.)
SUITE = "bookworm"
ROOT_PACKAGES = ("python3.11", "systemd")
MIRROR = os.environ.get("FLEETPROV_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE_MAX_AGE = 7 * 24 * 3600
SITE = "/usr/lib/fleetprov/lib/python3.11/site-packages"
ROOT_ENV = ("env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", "HOME=/root")
ARCH = (
    subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False).stdout.strip()
    if shutil.which("dpkg")
    else "unknown"  # _require_tools() fails the tests then
)


def _run(*command: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


def _check(*command: str, timeout: float = 300) -> str:
    done = _run(*command, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(command)}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: install the Makefile's DEB_PACKAGES (`make deps` as root). "
            "The Debian package test does not skip."
        )
    if os.geteuid() != 0:
        pytest.fail(
            f"running as uid {os.geteuid()}: installing the package into a Debian root needs root (chroot, files "
            "owned by the root's fleetprov user). The Debian package test does not skip."
        )


# ----------------------------------------------------------------------------------------------------------
# The Debian root


def _cache_file() -> Path:
    key = hashlib.sha256(f"{SUITE} {ARCH} {MIRROR} minbase {' '.join(ROOT_PACKAGES)}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fleetprov-tests" / f"debootstrap-{SUITE}-{ARCH}-{key}.tar"


def _make_root(root: Path) -> str:
    """A minimal Debian 12 root in ``root``, from the cache or from debootstrap; returns how it was made."""
    cache = _cache_file()
    root.mkdir()
    if cache.exists() and time.time() - cache.stat().st_mtime < CACHE_MAX_AGE:
        _check("tar", "-x", "-p", "--numeric-owner", "-f", str(cache), "-C", str(root))
        return f"cached {cache}"
    started = time.monotonic()
    done = _run(
        "debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}", SUITE, str(root), MIRROR,
        timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        log = root / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"debootstrap from {MIRROR} failed ({done.returncode}):\n{done.stderr[-3000:]}{detail}")
    how = f"debootstrap {time.monotonic() - started:.0f} s"
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    _check("tar", "-c", "--numeric-owner", "-f", str(partial), "-C", str(root), ".")
    partial.replace(cache)
    return how


@dataclass
class Built:
    deb: Path
    changes: Path
    log: str


@dataclass
class Root:
    path: Path
    made: str

    def run(self, *command: str, user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``command`` chrooted into the root, with a clean environment, as root or as ``user``."""
        userspec = () if user is None else (f"--userspec={self.ids(user)}",)
        return _run("chroot", *userspec, str(self.path), *ROOT_ENV, *command, timeout=timeout)

    def check(self, *command: str, user: str | None = None) -> str:
        """What ``command`` printed (standard output, then standard error); it must succeed."""
        done = self.run(*command, user=user)
        assert done.returncode == 0, (
            f"{' '.join(command)} in the root: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )
        return done.stdout + done.stderr

    def stdout(self, *command: str, user: str | None = None) -> str:
        done = self.run(*command, user=user)
        assert done.returncode == 0, (
            f"{' '.join(command)} in the root: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def ids(self, user: str) -> str:
        """``uid:gid`` of ``user`` in the root's /etc/passwd (not the host's)."""
        for line in (self.path / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return f"{fields[2]}:{fields[3]}"
        raise AssertionError(f"no user {user} in the root")

    def owner(self, path: str) -> tuple[str, str, str]:
        """(user, group, octal mode) of ``path`` as the root sees it."""
        user, group, mode = self.stdout("stat", "-c", "%U %G %a", path).split()
        return user, group, mode

    def __truediv__(self, path: str) -> Path:
        return self.path / path.lstrip("/")


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    _require_tools()
    # Not under pytest's basetemp: it keeps the last three runs, and a root is 300 MB.
    directory = Path(tempfile.mkdtemp(prefix="fleetprov-deb-"))
    yield directory
    if os.path.ismount(directory / "root/proc"):
        raise AssertionError(f"{directory}/root/proc is still mounted: not deleting {directory}")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def build_and_root(work: Path) -> Iterator[tuple[Built, Future[str]]]:
    """The package built (now) and the root being made meanwhile, in another thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:  # leaving it waits for the root, also after a failure
        root_made = pool.submit(_make_root, work / "root")
        out = work / "deb"
        done = _run("bash", str(SOURCE / "scripts/build-deb.sh"), str(out), timeout=600, cwd=SOURCE)
        assert done.returncode == 0, (
            f"scripts/build-deb.sh failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
        debs = sorted(out.glob("*.deb"))
        assert [deb.name for deb in debs] == [f"fleetprov_{__version__}_{ARCH}.deb"], debs
        changes = out / f"fleetprov_{__version__}_{ARCH}.changes"
        yield Built(debs[0], changes, done.stdout + done.stderr), root_made


@pytest.fixture(scope="module")
def built(build_and_root: tuple[Built, Future[str]]) -> Built:
    return build_and_root[0]


@pytest.fixture(scope="module")
def root(build_and_root: tuple[Built, Future[str]], work: Path) -> Iterator[Root]:
    """The Debian root with the package installed by dpkg, maintainer scripts and all."""
    deb, root_made = build_and_root[0].deb, build_and_root[1]
    installed = Root(work / "root", root_made.result(timeout=600))
    # A device has these, and an image build mounts /proc for maintainer scripts too (systemd-tmpfiles needs it).
    # `localhost` is the emulator's name in its certificate; debootstrap writes no /etc/hosts.
    (installed / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    proc = installed / "proc"
    _check("mount", "-t", "proc", "proc", str(proc))
    try:
        shutil.copy(deb, installed / "tmp")
        installed.check("dpkg", "--install", f"/tmp/{deb.name}")
        yield installed
    finally:
        if _run("umount", str(proc)).returncode != 0:
            _run("umount", "--lazy", str(proc))


# ----------------------------------------------------------------------------------------------------------
# The package file


def test_lintian_reports_no_errors_and_no_warnings(built: Built) -> None:
    """packaging/README.md lists the info-level tags that remain, and why."""
    done = _run("lintian", "--info", str(built.changes), timeout=300)
    problems = [line for line in done.stdout.splitlines() if re.match(r"[EWX]: ", line)]
    assert not problems, "\n".join(problems)
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_holds_the_agent_units_and_template_but_no_emulator(built: Built, work: Path) -> None:
    info = _check("dpkg-deb", "--info", str(built.deb))
    fields = dict(re.findall(r"^ (Package|Version|Architecture|Depends): (.*)$", info, re.MULTILINE))
    assert fields["Package"] == "fleetprov"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == ARCH
    depends = [alternatives.strip() for alternatives in fields["Depends"].split(",")]
    assert "python3.11" in depends
    assert "systemd | systemd-standalone-sysusers | systemd-sysusers" in depends
    assert "/etc/fleetprov/config.yaml" in _check("dpkg-deb", "--info", str(built.deb), "conffiles")

    paths = [
        line.split()[5].removeprefix(".") for line in _check("dpkg-deb", "--contents", str(built.deb)).splitlines()
    ]
    for path in (
        "/usr/bin/fleetprov",
        "/lib/systemd/system/fleetprov.service",  # /usr/lib/systemd/system on Debian 12's merged /usr
        "/lib/systemd/system/fleetprov-firstboot.service",
        "/usr/lib/sysusers.d/fleetprov.conf",
        "/usr/lib/tmpfiles.d/fleetprov.conf",
        "/etc/fleetprov/config.yaml",
        "/usr/lib/fleetprov/pyvenv.cfg",
        f"{SITE}/fleetprov/cli.py",
        f"{SITE}/awscrt/__init__.py",
        f"{SITE}/cryptography/__init__.py",
        f"{SITE}/pkcs11/__init__.py",
        "/usr/share/doc/fleetprov/README.Debian.gz",
        "/usr/share/doc/fleetprov/copyright",
        "/usr/share/doc/fleetprov/examples/config.example.yaml",
        "/usr/share/man/man1/fleetprov.1.gz",
    ):
        assert path in paths, path
    unwanted = re.compile(r"/emulator/|/amqtt|/cbor2|/tests?/|pytest|hypothesis|__pycache__|\.pyc$|/usr/lib/debug")
    assert not [path for path in paths if unwanted.search(path)]
    assert not [path for path in paths if path.startswith("/var/")], "/var/lib/fleetprov is made by tmpfiles.d"

    # The units, sysusers.d and tmpfiles.d entries exactly as in systemd/.
    unpacked = work / "unpacked"
    _check("dpkg-deb", "--extract", str(built.deb), str(unpacked))
    for packaged, source in (
        ("lib/systemd/system/fleetprov.service", "fleetprov.service"),
        ("lib/systemd/system/fleetprov-firstboot.service", "fleetprov-firstboot.service"),
        ("usr/lib/sysusers.d/fleetprov.conf", "fleetprov.sysusers"),
        ("usr/lib/tmpfiles.d/fleetprov.conf", "fleetprov.tmpfiles"),
    ):
        assert (unpacked / packaged).read_bytes() == (SOURCE / "systemd" / source).read_bytes(), packaged

    # config.yaml: a template that configures nothing, whose settings are the ones a device must have.
    template = (unpacked / "etc/fleetprov/config.yaml").read_text()
    assert yaml.safe_load(template) is None
    assert "THIS FILE DOES NOTHING" in template
    assert set(yaml.safe_load(_uncommented(template))) == {"endpoint", "root_ca", "claim", "provisioning"}


def _uncommented(template: str) -> str:
    """The template with its settings' '#' removed, as README.Debian tells an engineer to do: a '#' followed
    directly by a key, or by the spaces that indent one (then the key and its colon)."""
    setting = re.compile(r"^#(?=[A-Za-z_]|  +[A-Za-z_][\w-]*:)")
    return "".join(setting.sub("", line) for line in template.splitlines(keepends=True))


# ----------------------------------------------------------------------------------------------------------
# Installed into a Debian root


def test_install_creates_user_directories_statoverrides_and_enables_both_units(root: Root) -> None:
    assert root.stdout("getent", "passwd", "fleetprov").strip().split(":")[5:] == [
        "/var/lib/fleetprov",
        "/usr/sbin/nologin",
    ]
    assert root.owner("/etc/fleetprov") == ("root", "fleetprov", "750")
    assert root.owner("/etc/fleetprov/config.yaml") == ("root", "fleetprov", "640")
    assert root.owner("/var/lib/fleetprov") == ("fleetprov", "fleetprov", "700")
    assert sorted(root.stdout("dpkg-statoverride", "--list").splitlines()) == [
        "root fleetprov 640 /etc/fleetprov/config.yaml",
        "root fleetprov 750 /etc/fleetprov",
    ]
    wants = root / "etc/systemd/system/multi-user.target.wants"
    for unit in ("fleetprov.service", "fleetprov-firstboot.service"):
        assert os.readlink(wants / unit) == f"/lib/systemd/system/{unit}"
        assert (root / f"usr/lib/systemd/system/{unit}").is_file()  # the same file, through merged /usr
    # postinst byte-compiled the bundled packages: the service's user could not write them.
    assert list((root / SITE / "fleetprov/__pycache__").glob("cli.cpython-311.pyc"))
    assert list((root / SITE / "cryptography/__pycache__").glob("*.cpython-311.pyc"))


def test_installed_fleetprov_runs_from_its_own_environment(root: Root) -> None:
    done = root.run("fleetprov", "--version", user="fleetprov")
    assert (done.returncode, done.stdout.strip()) == (0, f"fleetprov {__version__}"), done.stderr
    # What runs is the root's: its python3.11 and the packages in /usr/lib/fleetprov, nothing from the host (the
    # source tree is outside the chroot) or from the root's dist-packages.
    probe = (
        "import json, sys, awscrt, awsiot, cryptography, fleetprov, pkcs11, tenacity, yaml\n"
        "modules = [awscrt, awsiot, cryptography, fleetprov, pkcs11, tenacity, yaml]\n"
        "print(json.dumps({'executable': sys.executable, 'prefix': sys.prefix, 'path': sys.path,\n"
        "    'files': [m.__file__ for m in modules], 'cryptography': cryptography.__version__,\n"
        "    'libyaml': yaml.__with_libyaml__}))"
    )
    seen = json.loads(root.stdout("/usr/lib/fleetprov/bin/python3", "-I", "-c", probe, user="fleetprov"))
    assert seen["executable"] == "/usr/lib/fleetprov/bin/python3"
    assert seen["prefix"] == "/usr/lib/fleetprov"
    assert all(file.startswith(f"{SITE}/") for file in seen["files"]), seen["files"]
    assert not [entry for entry in seen["path"] if "dist-packages" in entry], seen["path"]
    pins = (SOURCE / "packaging/debian/requirements.txt").read_text()
    assert f"\ncryptography=={seen['cryptography']} " in pins
    assert seen["libyaml"] is False  # the extension that embeds libyaml is left out
    assert (root / "usr/lib/fleetprov/bin/python3").resolve() == (root / "usr/bin/python3.11").resolve()

    # -I: a fleetprov package in the current directory or on PYTHONPATH is not what runs.
    decoy = root / "tmp/decoy/fleetprov"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('decoy imported')\n")
    done = root.run("sh", "-c", "cd /tmp/decoy && PYTHONPATH=/tmp/decoy exec fleetprov --version")
    assert (done.returncode, done.stdout.strip()) == (0, f"fleetprov {__version__}"), done.stderr
    shutil.rmtree(decoy.parent)

    # The emulator is not in the device package: a clear refusal, not a traceback.
    done = root.run("fleetprov", "emulator", "serve", "--state-dir", "/tmp/emulator", user="fleetprov")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "the emulator is not installed here" in done.stderr and "Traceback" not in done.stderr


def test_template_configuration_is_refused_with_exit_78(root: Root) -> None:
    """What the units do with the unfilled template: stop with 78, which they do not restart."""
    for command in (("--once",), ("run",)):
        done = root.run("fleetprov", *command, "--config", "/etc/fleetprov/config.yaml", user="fleetprov")
        assert done.returncode == 78, done.stdout + done.stderr
        assert "/etc/fleetprov/config.yaml: endpoint: missing" in done.stderr
        assert "Traceback" not in done.stderr
    assert not list((root / "var/lib/fleetprov").iterdir())
    # Uncommented, the template is a valid configuration (the files it names are not checked until used).
    (root / "tmp/uncommented.yaml").write_text(_uncommented((root / "etc/fleetprov/config.yaml").read_text()))
    shown = yaml.safe_load(root.stdout("fleetprov", "check-config", "--config", "/tmp/uncommented.yaml"))
    assert shown["root_ca"] == "/etc/ssl/certs/Amazon_Root_CA_1.pem"
    assert shown["claim"]["private_key"] == "/etc/fleetprov/claim.pem.key"


@pytest.fixture(scope="module")
def provisioned(root: Root, emulator: Emulator, work: Path) -> dict[str, str]:
    """config.yaml filled in for the emulator, the claim next to it, and a first `fleetprov --once`."""
    emulated = yaml.safe_load(device_config(emulator, work / "device").read_text())
    # As README.Debian says: the claim where the template expects it, then the template uncommented and
    # filled in (the emulator's endpoint, CA and template; a fixed serial; short retries).
    etc = root / "etc/fleetprov"
    shutil.copy(emulated["root_ca"], etc / "root-ca.pem")
    shutil.copy(emulated["claim"]["certificate"], etc / "claim.pem.crt")
    shutil.copy(emulated["claim"]["private_key"], etc / "claim.pem.key")
    root.check("chown", "root:fleetprov", "/etc/fleetprov/root-ca.pem", "/etc/fleetprov/claim.pem.crt")
    root.check("chown", "fleetprov:fleetprov", "/etc/fleetprov/claim.pem.key")
    root.check("chmod", "0600", "/etc/fleetprov/claim.pem.key")
    config = yaml.safe_load(_uncommented((etc / "config.yaml").read_text()))
    config.update(endpoint=emulated["endpoint"], port=emulated["port"], root_ca="/etc/fleetprov/root-ca.pem")
    config["provisioning"].update(template=emulated["provisioning"]["template"])
    config["provisioning"]["parameters"] = emulated["provisioning"]["parameters"]
    config["retry"] = emulated["retry"]
    # Edited in place, as an engineer would: dpkg must keep this version through upgrades.
    edited = "# edited on the device\n" + yaml.safe_dump(config, sort_keys=False)
    (etc / "config.yaml").write_text(edited)
    done = root.run("fleetprov", "--once", user="fleetprov", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"config": edited, "thing": f"fleetprov-{config['provisioning']['parameters']['static']['SerialNumber']}"}


def _status(root: Root) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(root.stdout("fleetprov", "status", "--json", user="fleetprov"))
    return status


def test_installed_fleetprov_provisions_against_the_emulator(root: Root, provisioned: dict[str, str]) -> None:
    status = _status(root)
    assert status["provisioned"] is True, status
    assert status["thing_name"] == provisioned["thing"]
    assert os.readlink(root / "var/lib/fleetprov/current") == "generations/1"
    assert root.owner("/var/lib/fleetprov/current/private.key") == ("fleetprov", "fleetprov", "600")
    # Provisioned: the next --once only verifies, with the same identity.
    done = root.run("fleetprov", "--once", user="fleetprov")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(root / "var/lib/fleetprov/current") == "generations/1"


def _wait_for(log: Path, text: str, process: subprocess.Popen[str], count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count(text) < count:
        assert process.poll() is None, f"fleetprov run exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{text!r} not logged within 60 s:\n{log.read_text()}"
        time.sleep(0.1)


def test_installed_daemon_provisions_anew_in_a_child_process_when_refused(
    root: Root, provisioned: dict[str, str], emulator: Emulator, work: Path
) -> None:
    """`fleetprov run` from the package; a revoked certificate makes it run `fleetprov reprovision` as a child
    process (sys.executable -m fleetprov), which must find the bundled packages too."""
    settings = yaml.safe_load(provisioned["config"])
    settings["daemon"] = {"reprovision_after": 1, "reconnect_initial_delay": 0.2, "reconnect_max_delay": 1}
    (root / "etc/fleetprov/daemon.yaml").write_text(yaml.safe_dump(settings))
    before = _status(root)
    log = work / "daemon.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["chroot", f"--userspec={root.ids('fleetprov')}", str(root.path), *ROOT_ENV,
             "fleetprov", "run", "--config", "/etc/fleetprov/daemon.yaml"],
            stdout=output, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        _wait_for(log, f"(thing {before['thing_name']})", process)
        emulator.admin("set-certificate-status", str(before["certificate_id"]), "REVOKED")
        _wait_for(log, "provisioning anew with the claim", process)
        _wait_for(log, f"(thing {before['thing_name']})", process, count=2)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()
    after = _status(root)
    assert after["certificate_id"] != before["certificate_id"]
    assert after["generation"] == before["generation"] + 1
    assert "Traceback" not in log.read_text()
    (root / "etc/fleetprov/daemon.yaml").unlink()


def _repack(deb: Path, version: str, work: Path) -> Path:
    """The same package with another version, as the next release would come."""
    tree = work / f"repack-{version}"
    _check("dpkg-deb", "--raw-extract", str(deb), str(tree))
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.MULTILINE))
    out = work / f"fleetprov_{version}_{ARCH}.deb"
    _check("dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(out))
    return out


def test_upgrade_keeps_the_edited_configuration_and_the_identity(
    root: Root, provisioned: dict[str, str], built: Built, work: Path
) -> None:
    before = _status(root)
    current = os.readlink(root / "var/lib/fleetprov/current")
    key = (root / "var/lib/fleetprov/current/private.key").read_bytes()
    newer = _repack(built.deb, f"{__version__}+test1", work)
    shutil.copy(newer, root / "tmp")
    output = root.check("dpkg", "--install", f"/tmp/{newer.name}")
    assert "Preparing to unpack" in output
    assert (
        root.stdout("dpkg-query", "-W", "-f=${Version} ${Status}", "fleetprov")
        == f"{__version__}+test1 install ok installed"
    )
    assert (root / "etc/fleetprov/config.yaml").read_text() == provisioned["config"]
    assert root.owner("/etc/fleetprov/config.yaml") == ("root", "fleetprov", "640")
    assert (root / "var/lib/fleetprov/current/private.key").read_bytes() == key
    assert _status(root)["certificate_id"] == before["certificate_id"]
    assert list((root / SITE / "fleetprov/__pycache__").glob("cli.cpython-311.pyc"))  # compiled again
    done = root.run("fleetprov", "--once", user="fleetprov")
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(root / "var/lib/fleetprov/current") == current


def test_remove_keeps_configuration_and_identity_and_purge_deletes_the_identity(
    root: Root, provisioned: dict[str, str]
) -> None:
    output = root.check("dpkg", "--remove", "fleetprov")
    assert "not empty" not in output  # prerm removed the byte-code: dpkg could remove every directory
    assert not (root / "usr/lib/fleetprov").exists()
    assert not (root / "usr/bin/fleetprov").exists()
    assert (root / "etc/fleetprov/config.yaml").read_text() == provisioned["config"]
    assert (root / "var/lib/fleetprov/current/certificate.pem").is_file()

    output = root.check("dpkg", "--purge", "fleetprov")
    assert "deleting /var/lib/fleetprov, this device's AWS IoT identity" in output
    assert not (root / "var/lib/fleetprov").exists()
    assert not (root / "etc/fleetprov/config.yaml").exists()
    # What the engineer put there is not the package's to delete, and purge says it is kept.
    assert "/etc/fleetprov is kept" in output
    assert sorted(path.name for path in (root / "etc/fleetprov").iterdir()) == [
        "claim.pem.crt",
        "claim.pem.key",
        "root-ca.pem",
    ]
    assert root.run("dpkg-statoverride", "--list").stdout == ""  # (and exit status 1: none)
    assert not list((root / "etc/systemd/system").glob("*/fleetprov*"))
    assert root.run("getent", "passwd", "fleetprov").returncode == 0  # system users stay (README.Debian)

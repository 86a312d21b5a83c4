"""The Yocto layer (packaging/yocto/meta-fleetprov/): held to the source tree it packages, without bitbake.

No bitbake build runs here. A small parser of the recipe syntax (``VAR = "value"``, ``VAR:append``,
``VAR:${PN}``, flags such as ``PACKAGECONFIG[pkcs11]``, backslash continuations, ``inherit`` and shell
functions such as ``do_install:append() { ... }``) reads the recipe and layer.conf, and each check compares
them with the tree: the version in the recipe's file name, the files do_install takes from ``${S}``, the units
SYSTEMD_SERVICE names, the account the units run as, the dependencies in pyproject.toml, LAYERDEPENDS, the
licence checksum (computed the way bitbake's license QA does) and the absence of key material.

Each check returns a list of problems, so that ``test_checks_catch_drift`` can feed it a recipe changed the way
it could drift (a unit renamed, a file moved, a dependency dropped) and see it fail.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

import fleetprov

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "packaging" / "yocto" / "meta-fleetprov"
RECIPE_DIR = LAYER / "recipes-iot" / "fleetprov"
LAYER_CONF = LAYER / "conf" / "layer.conf"
BBAPPEND_EXAMPLE = RECIPE_DIR / "fleetprov_%.bbappend.example"
SYSTEMD_DIR = ROOT / "systemd"
PYPROJECT = ROOT / "pyproject.toml"

# pyproject.toml's requirement names and the OpenEmbedded packages that provide them (meta-aws's
# aws-iot-device-sdk-python-v2 and aws-crt-python; meta-python and openembedded-core for the rest).
RUNTIME_PACKAGES = {
    "awsiotsdk": "aws-iot-device-sdk-python-v2",
    "awscrt": "aws-crt-python",
    "cryptography": "python3-cryptography",
    "pyyaml": "python3-pyyaml",
    "tenacity": "python3-tenacity",
}
PKCS11_PACKAGES = {"python-pkcs11": "python3-pkcs11", "asn1crypto": "python3-asn1crypto"}
# Releases a layer may name in LAYERSERIES_COMPAT (Yocto 5.0 onwards).
KNOWN_SERIES = {"scarthgap", "styhead", "walnascar", "whinlatter"}

ASSIGNMENT = re.compile(
    r"""^(?P<var>[A-Za-z0-9_\-]+(?:\[[A-Za-z0-9_\-]+\])?(?::[A-Za-z0-9_\-${}%]+)*)\s*
        (?P<op>\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*"(?P<value>.*)"\s*$""",
    re.VERBOSE,
)
FUNCTION_START = re.compile(r"^(?P<name>[A-Za-z0-9_\-:${}]+)\s*\(\)\s*\{\s*$")
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")


@dataclass
class Recipe:
    """What the parser understood of one recipe (or layer.conf): assignments, inherits and shell functions."""

    assignments: list[tuple[str, str, str]] = field(default_factory=list)
    inherits: list[str] = field(default_factory=list)
    functions: dict[str, str] = field(default_factory=dict)

    def value(self, var: str) -> str:
        """The variable's value as bitbake would see it without expansion: =, ?=, ??= set; +=, :append add."""
        result = ""
        for name, op, value in self.assignments:
            base, _, suffix = name.partition(":append")
            if base == var and suffix == "" and name.endswith(":append"):
                result += value
            elif name == var and op in ("=", ":=", "?=", "??="):
                if op in ("?=", "??=") and result:
                    continue
                result = value
            elif name == var and op in ("+=", ".="):
                result = f"{result} {value}" if op == "+=" else result + value
        return result

    def words(self, var: str) -> list[str]:
        return self.value(var).split()


def parse(text: str) -> Recipe:
    """Parse the recipe syntax this layer uses; anything else is an error, so that nothing is silently skipped."""
    recipe = Recipe()
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        # Backslash continuations, in assignments and elsewhere.
        while line.rstrip().endswith("\\") and index < len(lines):
            line = line.rstrip()[:-1] + " " + lines[index].strip()
            index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if function := FUNCTION_START.match(stripped):
            body = []
            while index < len(lines) and lines[index].rstrip() != "}":
                body.append(lines[index])
                index += 1
            if index == len(lines):
                raise ValueError(f"unterminated function {function['name']}")
            index += 1
            recipe.functions[function["name"]] = "\n".join(body)
            continue
        if stripped.startswith("inherit "):
            recipe.inherits.extend(stripped.split()[1:])
            continue
        if assignment := ASSIGNMENT.match(stripped):
            recipe.assignments.append((assignment["var"], assignment["op"], " ".join(assignment["value"].split())))
            continue
        raise ValueError(f"cannot parse: {stripped!r}")
    return recipe


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a shell function body, one word list per command (comments and continuations removed)."""
    commands = []
    joined = re.sub(r"\\\n", " ", body)
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            commands.append(shlex.split(stripped, comments=True))
    return commands


def installs(recipe: Recipe) -> dict[str, str]:
    """do_install's ``install SRC DEST`` commands: {source path relative to ${S}: destination}."""
    result = {}
    for command in shell_commands(recipe.functions.get("do_install:append", "")):
        if command[0] != "install" or "-d" in command:
            continue
        operands = []
        skip = False
        for word in command[1:]:
            if skip:
                skip = False
            elif word in ("-m", "-o", "-g"):
                skip = True
            elif not word.startswith("-"):
                operands.append(word)
        source, dest = operands[0], operands[-1]
        if source.startswith("${S}/"):
            result[source.removeprefix("${S}/")] = dest
    return result


def recipe_path() -> Path:
    recipes = sorted(RECIPE_DIR.glob("fleetprov_*.bb"))
    assert len(recipes) == 1, f"one fleetprov recipe expected in {RECIPE_DIR}, found {recipes}"
    return recipes[0]


def pyproject() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


# The checks. Each returns its problems; the tests below assert there are none.


def check_sources(recipe: Recipe) -> list[str]:
    """Every ${S} path in the recipe, in do_install and elsewhere, exists in the tree."""
    text = " ".join(value for _, _, value in recipe.assignments) + "\n" + "\n".join(recipe.functions.values())
    paths = set(re.findall(r"\$\{S\}/([^\s;\"']+)", text)) | set(installs(recipe))
    problems = [f"${{S}}/{path} is not in the source tree" for path in sorted(paths) if not (ROOT / path).exists()]
    if not paths:
        problems.append("the recipe installs nothing from ${S}")
    return problems


def check_units(recipe: Recipe) -> list[str]:
    """SYSTEMD_SERVICE names exactly systemd/'s units, each installed into ${systemd_system_unitdir}."""
    problems = []
    named = set(recipe.words("SYSTEMD_SERVICE:${PN}"))
    present = {path.name for path in SYSTEMD_DIR.glob("*.service")}
    problems += [f"SYSTEMD_SERVICE names {unit}, which is not in systemd/" for unit in sorted(named - present)]
    problems += [f"systemd/{unit} is not in SYSTEMD_SERVICE" for unit in sorted(present - named)]
    installed = installs(recipe)
    for unit in sorted(named):
        dest = installed.get(f"systemd/{unit}", "")
        if dest.rstrip("/") not in (
            "${D}${systemd_system_unitdir}",
            f"${{D}}${{systemd_system_unitdir}}/{unit}",
        ):
            problems.append(f"systemd/{unit} is not installed into ${{systemd_system_unitdir}} (got {dest!r})")
    if recipe.value("SYSTEMD_AUTO_ENABLE") not in ("enable", "disable"):
        problems.append("SYSTEMD_AUTO_ENABLE is neither enable nor disable")
    return problems


def check_system_files(recipe: Recipe) -> list[str]:
    """sysusers.d, tmpfiles.d and the configuration template go where systemd and fleetprov look for them."""
    expected = {
        "systemd/fleetprov.sysusers": "${D}${nonarch_libdir}/sysusers.d/fleetprov.conf",
        "systemd/fleetprov.tmpfiles": "${D}${nonarch_libdir}/tmpfiles.d/fleetprov.conf",
        "packaging/debian/config-template.yaml": "${D}${sysconfdir}/fleetprov/config.yaml",
    }
    installed = installs(recipe)
    problems = [
        f"{source} goes to {installed.get(source)!r}, expected {dest!r}"
        for source, dest in expected.items()
        if installed.get(source) != dest
    ]
    if "${sysconfdir}/fleetprov/config.yaml" not in recipe.words("CONFFILES:${PN}"):
        problems.append("CONFFILES:${PN} lacks ${sysconfdir}/fleetprov/config.yaml")
    return problems


def unit_setting(unit: Path, key: str) -> str:
    values = [
        line.split("=", 1)[1].strip()
        for line in unit.read_text(encoding="utf-8").splitlines()
        if line.startswith(f"{key}=")
    ]
    assert len(values) == 1, f"{unit.name}: {key}= {values}"
    return values[0]


def check_account(recipe: Recipe) -> list[str]:
    """The useradd class makes the account the units run as, the one systemd/fleetprov.sysusers declares."""
    problems = []
    if "useradd" not in recipe.inherits:
        problems.append("the recipe does not inherit useradd")
    if recipe.words("USERADD_PACKAGES") != ["${PN}"]:
        problems.append("USERADD_PACKAGES is not ${PN}")
    user_args = shlex.split(recipe.value("USERADD_PARAM:${PN}"))
    group_args = shlex.split(recipe.value("GROUPADD_PARAM:${PN}"))
    user = user_args[-1] if user_args else None
    group = group_args[-1] if group_args else None
    sysusers = [line.split() for line in (SYSTEMD_DIR / "fleetprov.sysusers").read_text().splitlines()]
    sysusers_user = {words[1] for words in sysusers if words and words[0] == "u"}
    sysusers_group = {words[1] for words in sysusers if words and words[0] == "g"}
    for unit in sorted(SYSTEMD_DIR.glob("*.service")):
        if unit_setting(unit, "User") != user:
            problems.append(f"{unit.name} runs as {unit_setting(unit, 'User')}, USERADD_PARAM makes {user}")
        if unit_setting(unit, "Group") != group:
            problems.append(f"{unit.name} runs as group {unit_setting(unit, 'Group')}, GROUPADD_PARAM makes {group}")
    if {user} != sysusers_user or {group} != sysusers_group:
        problems.append(f"useradd makes {user}:{group}, fleetprov.sysusers {sysusers_user}:{sysusers_group}")
    if "--system" not in user_args or "--system" not in group_args:
        problems.append("the account is not a system account")
    if user_args and ("--gid" not in user_args or user_args[user_args.index("--gid") + 1] != group):
        problems.append("USERADD_PARAM does not put the user into its group")
    return problems


def check_build_and_dependencies(recipe: Recipe) -> list[str]:
    """The build class matches the build backend; RDEPENDS covers pyproject.toml, without the emulator."""
    problems = []
    project = pyproject()
    backend = project["build-system"]["build-backend"]  # type: ignore[index]
    if backend == "setuptools.build_meta" and "python_setuptools_build_meta" not in recipe.inherits:
        problems.append(f"build-backend {backend} needs inherit python_setuptools_build_meta")
    for cls in ("systemd", "useradd"):
        if cls not in recipe.inherits:
            problems.append(f"the recipe does not inherit {cls}")
    rdepends = set(recipe.words("RDEPENDS:${PN}"))
    for requirement in project["project"]["dependencies"]:  # type: ignore[index]
        name = requirement_name(requirement)
        package = RUNTIME_PACKAGES.get(name)
        if package is None:
            problems.append(f"pyproject.toml depends on {name}: map it to a package in RUNTIME_PACKAGES")
        elif package not in rdepends:
            problems.append(f"RDEPENDS:${{PN}} lacks {package} ({name})")
    for extra in ("emulator",):
        for requirement in project["project"]["optional-dependencies"][extra]:  # type: ignore[index]
            name = requirement_name(requirement)
            if any(name in package for package in rdepends):
                problems.append(f"RDEPENDS:${{PN}} pulls in {name}, of the {extra} extra")
    pkcs11 = recipe.value("PACKAGECONFIG[pkcs11]").split(",")
    pkcs11_rdepends = set(pkcs11[3].split()) if len(pkcs11) >= 4 else set()
    for requirement in project["project"]["optional-dependencies"]["pkcs11"]:  # type: ignore[index]
        name = requirement_name(requirement)
        if PKCS11_PACKAGES.get(name, f"<unmapped {name}>") not in pkcs11_rdepends:
            problems.append(f"PACKAGECONFIG[pkcs11] does not add {name} at run time")
    removes = [
        command for command in shell_commands(recipe.functions.get("do_install:append", "")) if command[0] == "rm"
    ]
    if not any("${D}${PYTHON_SITEPACKAGES_DIR}/fleetprov/emulator" in command for command in removes):
        problems.append("do_install does not remove fleetprov/emulator from the package")
    return problems


def bitbake_md5(path: Path, beginline: int | None, endline: int | None) -> str:
    """The md5 bitbake's license QA computes: the whole file, or lines beginline..endline with their newlines."""
    data = path.read_bytes()
    if beginline is None and endline is None:
        return hashlib.md5(data).hexdigest()
    lines = data.splitlines(keepends=True)
    first = (beginline or 1) - 1
    last = endline or len(lines)
    return hashlib.md5(b"".join(lines[first:last])).hexdigest()


def check_license(recipe: Recipe) -> list[str]:
    """LICENSE agrees with pyproject.toml; each LIC_FILES_CHKSUM entry names a file of the tree with its md5."""
    problems = []
    project_license = pyproject()["project"]["license"]  # type: ignore[index]
    text = project_license.get("text") if isinstance(project_license, dict) else project_license
    if recipe.value("LICENSE") != text:
        problems.append(f"LICENSE is {recipe.value('LICENSE')!r}, pyproject.toml says {text!r}")
    entries = recipe.words("LIC_FILES_CHKSUM")
    if not entries:
        problems.append("no LIC_FILES_CHKSUM")
    for entry in entries:
        url, *params = entry.split(";")
        options = dict(param.split("=", 1) for param in params)
        path = ROOT / url.removeprefix("file://")
        if not url.startswith("file://") or not path.is_file():
            problems.append(f"LIC_FILES_CHKSUM names {url}, not a file of the tree")
            continue
        begin = int(options["beginline"]) if "beginline" in options else None
        end = int(options["endline"]) if "endline" in options else None
        actual = bitbake_md5(path, begin, end)
        if options.get("md5") != actual:
            problems.append(f"{url}: md5 {options.get('md5')} in the recipe, {actual} in the tree")
        if begin is not None:
            excerpt = b"".join(path.read_bytes().splitlines(keepends=True)[begin - 1 : end]).decode()
            if "Apache-2.0" not in excerpt:
                problems.append(f"{url} lines {begin}-{end} do not name the licence: {excerpt!r}")
    return problems


def check_layer_conf(conf: Recipe) -> list[str]:
    problems = []
    if "meta-fleetprov" not in conf.words("BBFILE_COLLECTIONS"):
        problems.append("BBFILE_COLLECTIONS lacks meta-fleetprov")
    for var in ("BBFILE_PATTERN_meta-fleetprov", "BBFILE_PRIORITY_meta-fleetprov"):
        if not conf.value(var):
            problems.append(f"{var} is not set")
    depends = set(conf.words("LAYERDEPENDS_meta-fleetprov"))
    problems += [f"LAYERDEPENDS lacks {layer}" for layer in ("meta-aws", "meta-python") if layer not in depends]
    series = set(conf.words("LAYERSERIES_COMPAT_meta-fleetprov"))
    if not series or not series <= KNOWN_SERIES:
        problems.append(f"LAYERSERIES_COMPAT names {sorted(series)}, expected releases from {sorted(KNOWN_SERIES)}")
    return problems


def check_no_secrets(texts: dict[str, str]) -> list[str]:
    return [f"{name} holds a PEM block" for name, text in texts.items() if PEM_BLOCK.search(text)]


# The tests.


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return parse(recipe_path().read_text(encoding="utf-8"))


def test_recipe_version_is_the_package_version() -> None:
    assert recipe_path().name == f"fleetprov_{fleetprov.__version__}.bb"


def test_recipe_parses_completely(recipe: Recipe) -> None:
    assert recipe.value("SUMMARY")
    assert "do_install:append" in recipe.functions
    assert recipe.value("SRC_URI")
    assert re.fullmatch(r"[0-9a-f]{40}", recipe.value("SRCREV")), "SRCREV must be a full commit id"


def test_installed_sources_exist(recipe: Recipe) -> None:
    assert check_sources(recipe) == []


def test_systemd_units(recipe: Recipe) -> None:
    assert check_units(recipe) == []


def test_sysusers_tmpfiles_and_config(recipe: Recipe) -> None:
    assert check_system_files(recipe) == []


def test_account(recipe: Recipe) -> None:
    assert check_account(recipe) == []


def test_build_class_and_dependencies(recipe: Recipe) -> None:
    assert check_build_and_dependencies(recipe) == []


def test_license_checksum(recipe: Recipe) -> None:
    assert check_license(recipe) == []


def test_layer_conf() -> None:
    assert check_layer_conf(parse(LAYER_CONF.read_text(encoding="utf-8"))) == []


def test_no_key_material_in_the_layer() -> None:
    files = [path for path in LAYER.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in (".pem", ".key", ".crt", ".p12", ".pfx")]
    assert check_no_secrets({str(path.relative_to(LAYER)): path.read_text(encoding="utf-8") for path in files}) == []


def test_bbappend_example_adds_the_claim_from_outside() -> None:
    example = parse(BBAPPEND_EXAMPLE.read_text(encoding="utf-8"))
    assert not list(RECIPE_DIR.glob("*.bbappend")), "only the .example, which bitbake does not read"
    assert {"file://claim.pem.crt", "file://claim.pem.key"} <= set(example.words("SRC_URI"))
    commands = shell_commands(example.functions["do_install:append"])
    key = [command for command in commands if any(word.endswith("/claim.pem.key") for word in command)]
    assert len(key) == 1
    # As systemd/README.md installs it: readable by the service's account only.
    assert key[0][:7] == ["install", "-m", "0600", "-o", "fleetprov", "-g", "fleetprov"]
    assert key[0][-1] == "${D}${sysconfdir}/fleetprov/claim.pem.key"


def test_checks_catch_drift(recipe: Recipe) -> None:
    """Each check fails on a recipe changed the way it could drift from the tree."""
    text = recipe_path().read_text(encoding="utf-8")

    def drifted(old: str, new: str) -> Recipe:
        assert old in text
        return parse(text.replace(old, new))

    renamed_unit = drifted("fleetprov-firstboot.service", "fleetprov-first-boot.service")
    assert check_units(renamed_unit)
    assert check_sources(renamed_unit)
    assert check_sources(drifted("${S}/packaging/debian/config-template.yaml", "${S}/packaging/config.yaml"))
    assert check_system_files(drifted("${nonarch_libdir}/tmpfiles.d/fleetprov.conf", "${libdir}/tmpfiles.d/x.conf"))
    assert check_account(drifted("--comment 'fleetprov device agent' fleetprov", "fleetprov-agent"))
    assert check_build_and_dependencies(drifted("    python3-tenacity \\\n", ""))
    assert check_build_and_dependencies(drifted("rm -rf ${D}${PYTHON_SITEPACKAGES_DIR}/fleetprov/emulator", "true"))
    assert check_license(drifted("md5=3b83ef96387f14655fc854ddc3c6bd57", "md5=00000000000000000000000000000000"))
    assert check_layer_conf(parse(LAYER_CONF.read_text(encoding="utf-8").replace(" meta-aws meta-python", "")))
    pem_header = "-" * 5 + "BEGIN " + "PRIVATE KEY" + "-" * 5  # built here: no key-like text in the repository
    assert check_no_secrets({"recipe": text + f'\nX = "{pem_header}"\n'})
    with pytest.raises(ValueError, match="cannot parse"):
        parse(text + "\nunknown syntax here\n")

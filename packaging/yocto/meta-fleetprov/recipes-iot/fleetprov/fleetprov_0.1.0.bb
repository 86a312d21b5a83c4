SUMMARY = "fleetprov: device agent that gives a factory-fresh Linux device its permanent AWS IoT identity"
DESCRIPTION = "Provisions the device through AWS IoT fleet provisioning by claim at first boot \
(fleetprov-firstboot.service), then keeps a connection with its permanent identity and rotates it \
(fleetprov.service). Configuration: /etc/fleetprov/config.yaml."
HOMEPAGE = "https://example.com/fleetprov"
SECTION = "console/network"

# The checksum covers the project's LICENSE (the Apache License 2.0 text); tests/unit/test_yocto_layer.py
# recomputes it.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# The source. Release builds fetch a tagged commit of the project's repository: replace the placeholder URL
# and SRCREV (the commit of the v${PV} tag). For development, build the working tree instead, without
# editing this file, with externalsrc in local.conf (README.md, "Building from a checkout").
SRC_URI = "git://git.example.com/fleetprov.git;protocol=https;branch=main"
SRCREV = "0000000000000000000000000000000000000000"

# Where the fetcher unpacks: UNPACKDIR in styhead and later; the ??= gives scarthgap releases that lack the
# variable the directory they use (WORKDIR).
UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/git"

# pyproject.toml: build-backend = "setuptools.build_meta".
inherit python_setuptools_build_meta systemd useradd

# The account both units run as (systemd/fleetprov.sysusers makes the same one where systemd-sysusers runs;
# the useradd class makes it at rootfs time on every image, also read-only ones without sysusers).
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system fleetprov"
USERADD_PARAM:${PN} = "--system --gid fleetprov --home-dir /var/lib/fleetprov --no-create-home \
                       --shell ${base_sbindir}/nologin --comment 'fleetprov device agent' fleetprov"

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "fleetprov.service fleetprov-firstboot.service"
# Both enabled: the first boot provisions, the agent keeps the identity. Until config.yaml is filled in
# (or replaced by a bbappend) both stop at once with exit status 78, which systemd does not restart.
SYSTEMD_AUTO_ENABLE = "enable"

do_install:append() {
    # Units, sysusers.d and tmpfiles.d entries exactly as in the source tree's systemd/.
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/fleetprov.service ${D}${systemd_system_unitdir}/fleetprov.service
    install -m 0644 ${S}/systemd/fleetprov-firstboot.service ${D}${systemd_system_unitdir}/fleetprov-firstboot.service
    # nonarch_libdir: systemd reads /usr/lib/{sysusers,tmpfiles}.d, never /usr/lib64.
    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/fleetprov.sysusers ${D}${nonarch_libdir}/sysusers.d/fleetprov.conf
    install -m 0644 ${S}/systemd/fleetprov.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/fleetprov.conf

    # The configuration template the Debian package ships (every setting commented out), root:fleetprov.
    install -d -m 0750 -o root -g fleetprov ${D}${sysconfdir}/fleetprov
    install -m 0640 -o root -g fleetprov ${S}/packaging/debian/config-template.yaml ${D}${sysconfdir}/fleetprov/config.yaml

    # The emulator is a development tool: not on the device (its extra, amqtt, is not a dependency here).
    # `fleetprov emulator` then exits 78 with "the emulator is not installed here".
    rm -rf ${D}${PYTHON_SITEPACKAGES_DIR}/fleetprov/emulator
}

FILES:${PN} += " \
    ${systemd_system_unitdir}/fleetprov.service \
    ${systemd_system_unitdir}/fleetprov-firstboot.service \
    ${nonarch_libdir}/sysusers.d/fleetprov.conf \
    ${nonarch_libdir}/tmpfiles.d/fleetprov.conf \
"

CONFFILES:${PN} = "${sysconfdir}/fleetprov/config.yaml"

# pyproject.toml's dependencies. aws-iot-device-sdk-python-v2 and aws-crt-python are meta-aws's recipes
# (awsiotsdk and awscrt): pyproject.toml pins awsiotsdk 1.31.0 and awscrt 0.36.1; check that your meta-aws
# branch has versions fleetprov was tested with. The python3-* standard library packages are those of the
# modules fleetprov imports (not checked by a build; python3-modules is the catch-all).
RDEPENDS:${PN} += " \
    aws-iot-device-sdk-python-v2 \
    aws-crt-python \
    python3-cryptography \
    python3-pyyaml \
    python3-tenacity \
    python3-asyncio \
    python3-crypt \
    python3-datetime \
    python3-fcntl \
    python3-json \
    python3-logging \
    python3-math \
    python3-netclient \
    python3-shell \
"

# Keys in a PKCS#11 token (keys.backend: pkcs11), pyproject.toml's pkcs11 extra: PACKAGECONFIG:append:pn-fleetprov
# = " pkcs11" in local.conf. meta-python has python3-asn1crypto; python3-pkcs11 (python-pkcs11) was not found in
# meta-openembedded: it must come from another layer (some BSP layers carry one) or a recipe of your own.
PACKAGECONFIG ??= ""
PACKAGECONFIG[pkcs11] = ",,,python3-pkcs11 python3-asn1crypto"

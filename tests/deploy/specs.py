"""Readers for the deployment files, so tests can check them without a Docker engine.

- :func:`parse_dockerfile`: stages and instructions of a Dockerfile (line continuations,
  comments, parser directives, ``--flag`` options, exec and shell forms), and
  :meth:`Dockerfile.image` for what a target ends up with (ENV, WORKDIR, USER, EXPOSE,
  CMD, HEALTHCHECK), inherited through ``FROM <stage>``.
- :class:`DockerIgnore`: Docker's ``.dockerignore`` rules as moby/patternmatcher applies
  them (Go ``filepath.Match`` syntax plus ``**``, ``!`` exceptions, the last matching
  pattern wins, a pattern that matches a parent directory matches everything below it).
- :func:`load_compose`: ``docker-compose.yml`` parsed with Compose's ``${VAR}``,
  ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` interpolation.
- :func:`read_env_file`: ``KEY=value`` lines of an env file, optionally with the
  commented-out ``# KEY=value`` lines too.

Constructs these readers do not understand (heredocs, the legacy ``ENV key value`` form,
an escape directive) raise :class:`SpecError`, so a test never reads a file wrongly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")

# PATH of the official python images, the base every stage starts from.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"

_VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class SpecError(ValueError):
    """A deployment file holds something these readers cannot interpret."""


# -- Dockerfile ---------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    text: str  # everything after the keyword, continuation lines joined, flags included
    line: int  # 1-based line of the keyword

    def split_flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` options (RUN, COPY, FROM, HEALTHCHECK) and the rest."""
        flags: dict[str, str] = {}
        rest = self.text.lstrip()
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            flags[name] = value
            rest = rest.lstrip()
        return flags, rest

    @property
    def flags(self) -> dict[str, str]:
        return self.split_flags()[0]

    @property
    def body(self) -> str:
        return self.split_flags()[1]

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, else None (shell form)."""
        body = self.body
        if not body.startswith("["):
            return None
        value = json.loads(body)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise SpecError(f"line {self.line}: {self.keyword} array must hold strings")
        return value


@dataclass
class Stage:
    index: int
    base: str  # the FROM image or stage name, ARGs not substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Image:
    """What a target ends up with, inherited along its chain of stages."""

    chain: list[Stage]
    env: dict[str, str]
    args: dict[str, str]
    workdir: str
    user: str | None
    expose: list[str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    healthcheck: Instruction | None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def stage(self, name: str | None) -> Stage:
        """A stage by name; None is the default target (the last stage)."""
        if name is None:
            return self.stages[-1]
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {self.stage_names}")

    def chain(self, name: str | None) -> list[Stage]:
        """The target stage and the stages it is built FROM, base first."""
        stages = [self.stage(name)]
        while stages[0].base in self.stage_names:
            stages.insert(0, self.stage(stages[0].base))
        return stages

    def all_arg_names(self) -> set[str]:
        names = set(self.global_args)
        for s in self.stages:
            for ins in s.of("ARG"):
                names.add(parse_arg(ins)[0])
        return names

    def image(self, target: str | None = None, build_args: Mapping[str, str] = {}) -> Image:
        env: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
        workdir, user = "/", None
        expose: list[str] = []
        cmd = entrypoint = None
        healthcheck = None
        chain = self.chain(target)
        args: dict[str, str] = {}
        for stage in chain:
            args = {}  # ARGs are scoped to their stage
            for ins in stage.instructions:
                if ins.keyword == "ARG":
                    name, default = parse_arg(ins)
                    if name in build_args:
                        args[name] = build_args[name]
                    elif default is not None:
                        args[name] = substitute(default, {**self.global_args, **env, **args})
                    elif name in self.global_args:
                        args[name] = self.global_args[name]
                elif ins.keyword == "ENV":
                    for key, value in parse_env(ins):
                        env[key] = substitute(value, {**args, **env})
                elif ins.keyword == "WORKDIR":
                    path = substitute(ins.body, {**args, **env})
                    workdir = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
                elif ins.keyword == "USER":
                    user = ins.body
                elif ins.keyword == "EXPOSE":
                    expose.extend(ins.body.split())
                elif ins.keyword == "CMD":
                    cmd = ins.exec_form()
                    if cmd is None:
                        raise SpecError(f"line {ins.line}: use the exec form for CMD")
                elif ins.keyword == "ENTRYPOINT":
                    entrypoint = ins.exec_form()
                elif ins.keyword == "HEALTHCHECK":
                    healthcheck = ins
        return Image(chain, env, args, workdir, user, expose, cmd, entrypoint, healthcheck)


def parse_dockerfile(text: str) -> Dockerfile:
    lines = text.splitlines()
    logical: list[tuple[int, str]] = []
    i = 0
    # Parser directives: comment lines of the form "# key=value" before anything else.
    while i < len(lines) and re.match(r"^#\s*[a-zA-Z_]+\s*=", lines[i]):
        key = lines[i].lstrip("#").split("=", 1)[0].strip().lower()
        if key == "escape":
            raise SpecError("an escape directive is not supported by this reader")
        i += 1
    while i < len(lines):
        start = i
        raw = lines[i]
        i += 1
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [raw]
        while parts[-1].rstrip().endswith("\\"):
            parts[-1] = parts[-1].rstrip()[:-1]
            # Comment and empty lines inside an instruction are dropped, as Docker does.
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                i += 1
            if i >= len(lines):
                break
            parts.append(lines[i])
            i += 1
        joined = " ".join(p.strip() for p in parts)
        if "<<" in joined.split("#")[0] and re.search(r"<<-?\s*['\"]?[A-Z]+", joined):
            raise SpecError(f"line {start + 1}: heredocs are not supported by this reader")
        logical.append((start + 1, joined))

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text_ in logical:
        keyword, _, rest = text_.partition(" ")
        ins = Instruction(keyword.upper(), rest.strip(), line)
        if ins.keyword == "FROM":
            words = ins.body.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            if len(words) not in (1, 3):
                raise SpecError(f"line {line}: cannot read FROM {ins.body!r}")
            stages.append(Stage(len(stages), words[0], name))
        elif not stages:
            if ins.keyword != "ARG":
                raise SpecError(f"line {line}: only ARG may come before the first FROM")
            name, default = parse_arg(ins)
            global_args[name] = default or ""
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise SpecError("no FROM instruction")
    return Dockerfile(global_args, stages)


def load_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    return parse_dockerfile(path.read_text())


def parse_arg(ins: Instruction) -> tuple[str, str | None]:
    name, eq, default = ins.body.partition("=")
    if " " in name.strip():
        raise SpecError(f"line {ins.line}: one ARG per instruction, please")
    return name.strip(), (shlex.split(default)[0] if default.strip() else "") if eq else None


def parse_env(ins: Instruction) -> list[tuple[str, str]]:
    pairs = []
    for word in shlex.split(ins.body, posix=True):
        key, eq, value = word.partition("=")
        if not eq:
            raise SpecError(f"line {ins.line}: write ENV as key=value pairs ({word!r})")
        pairs.append((key, value))
    return pairs


def substitute(value: str, env: Mapping[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` as Docker expands them in ENV, WORKDIR and ARG defaults."""
    return _VAR_RE.sub(lambda m: env.get(m.group("braced") or m.group("plain"), ""), value)


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY or ADD instruction."""
    words = ins.exec_form() or shlex.split(ins.body)
    if len(words) < 2:
        raise SpecError(f"line {ins.line}: {ins.keyword} needs a source and a destination")
    return words[:-1], words[-1]


def healthcheck_command(ins: Instruction) -> list[str]:
    """The exec-form command of ``HEALTHCHECK [OPTIONS] CMD [...]``."""
    body = ins.body
    if not body.startswith("CMD "):
        raise SpecError(f"line {ins.line}: HEALTHCHECK must be OPTIONS CMD [...]")
    command = json.loads(body[4:])
    if not isinstance(command, list):
        raise SpecError(f"line {ins.line}: use the exec form for HEALTHCHECK CMD")
    return command


def run_script(ins: Instruction) -> str:
    """The shell text of a shell-form RUN, its --mount/--network options removed."""
    if ins.exec_form() is not None:
        raise SpecError(f"line {ins.line}: expected a shell-form RUN")
    return ins.body


# -- the README's Docker section ------------------------------------------------------------
def docker_section(text: str) -> str:
    m = re.search(r"^## Docker\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if m is None:
        raise SpecError(
            "README.md has no '## Docker' section: paste the deployment section there "
            "(docs of Dockerfile, docker-compose.yml and scaling out)"
        )
    return m.group(1)


def shell_lines(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def words_of(line: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, words) of one shell command, comments dropped."""
    line = re.sub(r"\$\([^)]*\)", "$SUBSTITUTED", line)
    words = shlex.split(line, comments=True)
    assignments = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        assignments[key] = value
    return assignments, words


def options(words: list[str], with_value: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split leading options from positional words; ``--opt=value`` or ``--opt value``."""
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(words) and words[i].startswith("-"):
        name, eq, value = words[i].partition("=")
        if not eq and name in with_value:
            i += 1
            value = words[i]
        found.append((name, value))
        i += 1
    return found, words[i:]


# -- .dockerignore ------------------------------------------------------------------------
def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation of a Go filepath.Match pattern with ``**``."""
    out = "^"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    out += "(.*/)?"
                    i += 1
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\":
            i += 1
            out += re.escape(pattern[i]) if i < len(pattern) else "\\\\"
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise SpecError(f"unterminated character class in {pattern!r}")
            cls = pattern[i + 1 : end]
            out += "[" + ("^" + cls[1:] if cls.startswith("^") else cls) + "]"
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def _clean(pattern: str) -> str:
    # Go's filepath.Clean, enough for patterns: collapse separators and "./", drop a
    # trailing slash; a leading "/" is the context root.
    parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
    return "/".join(parts) or "."


@dataclass
class DockerIgnore:
    rules: list[tuple[bool, str, re.Pattern[str]]]  # (is exception "!", pattern, regex)

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = _clean(line[1:].strip() if exception else line)
            rules.append((exception, pattern, _compile_pattern(pattern)))
        return cls(rules)

    @classmethod
    def load(cls, path: Path = DOCKERIGNORE) -> DockerIgnore:
        return cls.parse(path.read_text())

    def excludes(self, path: str) -> bool:
        """Whether ``path`` (relative to the context, "/"-separated) is left out."""
        path = _clean(path)
        parents = path.split("/")[:-1]
        excluded = False
        for exception, _, regex in self.rules:
            match = bool(regex.match(path)) or any(
                regex.match("/".join(parents[: k + 1])) for k in range(len(parents))
            )
            if match:
                excluded = not exception
        return excluded

    def context_files(self, root: Path, under: str = "") -> list[str]:
        """Files of the build context below ``under``: what ``docker build`` would send.

        Like Docker, it does not descend into an excluded directory that no ``!``
        exception could reach into (so a 6 GB virtualenv is not walked).
        """
        base = root / under if under else root
        if base.is_file():
            rel = base.relative_to(root).as_posix()
            return [] if self.excludes(rel) else [rel]
        files = []
        for dirpath, dirnames, filenames in os.walk(base):
            current = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                rel = (current / d).relative_to(root).as_posix()
                if not self.excludes(rel) or self._may_reinclude_below(rel):
                    keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                rel = (current / f).relative_to(root).as_posix()
                if not self.excludes(rel):
                    files.append(rel)
        return sorted(files)

    def _may_reinclude_below(self, directory: str) -> bool:
        for exception, pattern, _ in self.rules:
            wildcard = any(c in pattern for c in "*?[")
            if exception and (wildcard or pattern.startswith(directory + "/")):
                return True
        return False


# -- docker-compose.yml ---------------------------------------------------------------------
_INTERP_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one string."""

    def repl(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        present = name in env
        current = env.get(name, "")
        if op in (":-", "-"):
            use_default = (not present) or (op == ":-" and current == "")
            return interpolate(arg, env) if use_default else current
        if op in (":?", "?"):
            if (not present) or (op == ":?" and current == ""):
                raise SpecError(f"variable {name} is required: {arg}")
            return current
        if op in (":+", "+"):
            use_alt = present and (op == "+" or current != "")
            return interpolate(arg, env) if use_alt else ""
        return current

    return _INTERP_RE.sub(repl, value)


def interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_all(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_all(v, env) for k, v in node.items()}
    return node


def compose_variables(node: Any) -> set[str]:
    """Names of the variables a compose document interpolates."""
    if isinstance(node, str):
        return {
            m.group("braced") or m.group("plain")
            for m in _INTERP_RE.finditer(node)
            if not m.group("escaped")
        }
    if isinstance(node, list):
        return set().union(*(compose_variables(v) for v in node)) if node else set()
    if isinstance(node, dict):
        return set().union(*(compose_variables(v) for v in node.values())) if node else set()
    return set()


def load_compose_raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise SpecError(f"{path} is not a mapping")
    return data


def load_compose(path: Path = COMPOSE_FILE, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = interpolate_all(load_compose_raw(path), env or {})
    return result


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def service_mounts(service: Mapping[str, Any]) -> list[Mount]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            mounts.append(Mount(parts[0], parts[1], "ro" in mode.split(",")))
        else:
            mounts.append(Mount(volume["source"], volume["target"], bool(volume.get("read_only"))))
    return mounts


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float:
    """Seconds in a Compose duration such as ``1m30s``."""
    text = str(text).strip()
    if not text or _DURATION_RE.sub("", text):
        raise SpecError(f"{text!r} is not a duration like 45s or 1m30s")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION_RE.findall(text))


def port_range(host: str) -> list[int]:
    """Host ports of a published-port spec ``8000`` or ``8000-8003``."""
    if "-" in host:
        low, high = (int(p) for p in host.split("-", 1))
        return list(range(low, high + 1))
    return [int(host)]


def split_port(spec: str) -> tuple[str, str]:
    """(host part, container port) of ``[IP:]HOST:CONTAINER``."""
    parts = str(spec).split(":")
    if len(parts) < 2:
        return "", parts[0]
    return parts[-2], parts[-1].split("/")[0]


# -- env files ------------------------------------------------------------------------------
_ENV_LINE_RE = re.compile(r"^(?P<comment>#\s*)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


def read_env_file(path: Path = ENV_EXAMPLE, commented: bool = False) -> dict[str, str]:
    """``KEY=value`` lines; with ``commented``, also the ``# KEY=value`` ones."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        m = _ENV_LINE_RE.match(raw.strip())
        if not m or (m.group("comment") and not commented):
            continue
        value = m.group("value").strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[m.group("key")] = value
    return values


def flatten(items: Iterable[Iterable[str]]) -> list[str]:
    return [x for sub in items for x in sub]

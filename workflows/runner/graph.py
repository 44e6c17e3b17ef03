"""A recipe's stages as a graph: named instances of stage kinds, joined by what they output.

Each instance takes its inputs on its kind's ports (workflows/runner/stage.py `Port`):
from the instances its `from:` names (a list, matched to ports by what each outputs, or
a mapping port -> instance), and for every port left open, from the nearest earlier
instance in the recipe whose kind outputs what the port accepts. A recipe that writes
only kind names and no `from:` is therefore today's straight line of stages.

Values that flow along the edges (the training sequence length, the system prompt, the
model's config) are worked out here, before anything runs, so a setting that cannot work
with its inputs (extend-context to a length shorter than its model's) is one line now
and never a failure an hour into the pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llm_lifecycle.workflows import stages as kinds
from llm_lifecycle.workflows.runner.settings import ConfigError, build

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


@dataclass
class Instance:
    name: str  # unique in the recipe; the MLflow run name and the registry alias
    kind: str
    settings: Any  # the kind's Settings dataclass, validated
    sources: dict[str, str]  # port -> the instance it takes that input from
    upstream: dict[str, Any]  # what its inputs pass on (seq_len, base_seq_len, system_prompt, model)
    values: dict[str, Any]  # what it passes on: upstream with its own values over it
    written_from: Any = None  # `from:` as the recipe wrote it (for the resolved recipe.yaml)
    position: int = 0  # its place in the recipe

    @property
    def spec(self):
        return kinds.kind(self.kind)


@dataclass
class Section:
    """One stage as the recipe writes it, before its settings are validated."""

    name: str
    kind: str
    given: dict[str, Any]
    written_from: Any
    position: int
    sources: dict[str, str] = field(default_factory=dict)


def parse_sections(path, stages: dict[str, Any]) -> list[Section]:
    out = []
    for position, (name, section) in enumerate(stages.items()):
        where = f"{path}: stages.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{path}: stages.{name}: a stage name is letters, digits, '_' or '-' (at most 63, "
                              "starting with a letter or digit)")
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: expected a mapping of settings")
        section = dict(section)
        kind = section.pop("kind", name)
        if kind not in kinds.MODULES:
            known = ", ".join(kinds.MODULES)
            if "kind" in (stages[name] or {}):
                raise ConfigError(f"{where}.kind: unknown stage kind {kind!r}; kinds are {known}")
            raise ConfigError(f"{where}: unknown stage; a stage named after no kind needs `kind:` (one of {known})")
        out.append(Section(name, kind, section, section.pop("from", None), position))
    return out


def _output(section: Section) -> str | None:
    return kinds.kind(section.kind).output


def _bind(path, sections: list[Section]) -> None:
    """Fill each section's `sources`: its `from:`, then the nearest earlier provider per open port."""
    by_name = {s.name: s for s in sections}
    for s in sections:
        where = f"{path}: stages.{s.name}.from"
        ports = kinds.kind(s.kind).inputs
        port_names = [p.name for p in ports]
        written = s.written_from
        if isinstance(written, str):
            written = [written]
        if isinstance(written, dict):
            pairs = list(written.items())
            for port, _ in pairs:
                if port not in port_names:
                    takes = ", ".join(port_names) or "nothing"
                    raise ConfigError(f"{where}.{port}: {s.kind} has no input '{port}'; it takes {takes}")
        elif isinstance(written, list):
            pairs = [(None, source) for source in written]
        elif written is None:
            pairs = []
        else:
            raise ConfigError(f"{where}: expected a stage name, a list of them, or a mapping input -> stage")
        for port_name, source in pairs:
            if not isinstance(source, str) or source not in by_name:
                raise ConfigError(f"{where}: no stage named {source!r}; stages are {', '.join(by_name)}")
            if source == s.name:
                raise ConfigError(f"{where}: a stage cannot take its own output")
            gives = _output(by_name[source])
            open_ports = [p for p in ports if p.name not in s.sources and (port_name in (None, p.name))]
            port = next((p for p in open_ports if p.accepts == gives), None)
            if port is None:
                takes = ", ".join(f"{p.name} ({p.accepts})" for p in ports) or "nothing"
                gives_text = f"gives {gives}" if gives else "gives nothing later stages take"
                raise ConfigError(f"{where}: '{source}' (a {by_name[source].kind} stage) {gives_text}, which "
                                  f"{s.kind} does not take{' on ' + port_name if port_name else ''}; it takes {takes}")
            s.sources[port.name] = source
        for port in ports:
            if port.name in s.sources or not port.default or (port.unless and s.given.get(port.unless)):
                continue
            earlier = [e for e in sections[: s.position] if _output(e) == port.accepts]
            if earlier:
                s.sources[port.name] = earlier[-1].name
            elif port.required:
                makers = ", ".join(k for k in kinds.MODULES if kinds.kind(k).output == port.accepts)
                raise ConfigError(f"{path}: stages.{s.name}: {s.kind} needs a {port.accepts} ({port.name}) from an "
                                  f"earlier stage ({makers}); add one or name it in `from:`")
        s.sources = {p.name: s.sources[p.name] for p in ports if p.name in s.sources}  # in port order
        missing = [p.name for p in ports if p.required and not p.default and p.name not in s.sources]
        if missing:
            raise ConfigError(f"{where}: {s.kind} needs `from: {{{', '.join(f'{m}: STAGE' for m in missing)}}}`")


def _topological(path, sections: list[Section]) -> list[Section]:
    """Sections in an order where every stage comes after its inputs (ties: recipe order)."""
    done: list[Section] = []
    placed: set[str] = set()
    remaining = list(sections)
    while remaining:
        ready = next((s for s in remaining if set(s.sources.values()) <= placed), None)
        if ready is None:
            raise ConfigError(f"{path}: stages: the `from:` links form a cycle ({_cycle(remaining)}); "
                              "a stage can only take outputs of stages that do not depend on it")
        done.append(ready)
        placed.add(ready.name)
        remaining.remove(ready)
    return done


def _cycle(remaining: list[Section]) -> str:
    by_name = {s.name: s for s in remaining}
    node, seen = remaining[0].name, []
    while node not in seen:
        seen.append(node)
        node = next(src for src in by_name[node].sources.values() if src in by_name)
    loop = seen[seen.index(node):] + [node]
    return " <- ".join(loop)


def build_graph(path, stages: dict[str, Any], base_values: dict[str, Any]) -> dict[str, Instance]:
    """The recipe's instances, validated, in the order they run."""
    sections = parse_sections(path, stages)
    _bind(path, sections)
    instances: dict[str, Instance] = {}
    for s in _topological(path, sections):
        spec = kinds.kind(s.kind)
        _require_needed_outputs(path, s, spec, instances)
        upstream = dict(base_values)
        for port in reversed(spec.inputs):  # the first port's values win (a model's over the shards')
            if port.name in s.sources and port.passes:
                upstream.update(instances[s.sources[port.name]].values)
        settings = build(spec.settings, s.given, f"{path}: stages.{s.name}", upstream)
        settings.check_wiring(f"{path}: stages.{s.name}", set(s.sources))
        values = {**upstream, **settings.passes_on(upstream)}
        instances[s.name] = Instance(s.name, s.kind, settings, dict(s.sources), upstream, values, s.written_from,
                                     s.position)
    return instances


def _require_needed_outputs(path, section: Section, spec, instances: dict[str, Instance]) -> None:
    for port in spec.inputs:
        source = instances.get(section.sources.get(port.name, ""))
        if port.needs and source is not None and port.needs not in source.settings.makes():
            raise ConfigError(f"{path}: stages.{section.name}.from: {port.name} <- {source.name}, which makes no "
                              f"{port.needs}; name a stage that makes one")


def dependents(instances: dict[str, Instance], names: set[str]) -> set[str]:
    """`names` and every instance that takes their outputs, directly or not."""
    out = set(names)
    for inst in instances.values():  # in run order, so one pass reaches every descendant
        if set(inst.sources.values()) & out:
            out.add(inst.name)
    return out

"""The runtime's second use case: one attempt of a workflow step, taken from the bus.

The operator's workflow engine puts an `taskwire.AgentTask` on the agent's stream for
each attempt of a step. Running it:

1. read the artifacts the step requires from object storage, by URI and version id,
   through the objectStorage Integration bound into this agent (the task names it);
2. run one turn (`turns.run`): the artifacts become the context's workflow-artifact
   layer, the user message says which workflow, step, item and attempt this is, the
   run's inputs, the step's description and what to hand back;
3. split the answer: an optional fenced block whose info string is ``bmad`` (the last
   one, YAML: ``items``, ``outputs``, ``failed``) declares what the engine needs
   besides the document; the rest is the artifact;
4. store the artifact as a new version of the key the task names, and answer with a
   `taskwire.StepOutput`: its URI and version id, the items, the outputs, the tokens.

A step that cannot succeed however often it is delivered (the agent declares
``failed``, the model chain fails, an artifact is missing, the answer is malformed)
raises `bus.consumer.TaskFailedError`: the engine sees the failure at once and applies
the step's retries and backoff. Anything else (Redis or S3 unavailable) is left to the
bus's redelivery, as if this replica had died.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
import yaml

from bmad_integrations import taskwire
from bmad_runtime import artifacts as artifacts_mod
from bmad_runtime import bindings as bindings_mod
from bmad_runtime import context, ports, schemas, turns
from bmad_runtime.bus import consumer
from bmad_runtime.providers import router as providers_router

BLOCK_INFO = "bmad"
BLOCK_KEYS = ("items", "outputs", "failed")
# An artifact longer than this is cut in the prompt (the stored version stays whole).
ARTIFACT_PROMPT_MAX_CHARS = 200_000
SCOPE = "workflows"  # ArtifactStore's scope; steps address objects by key

_BLOCK = re.compile(rf"^```{BLOCK_INFO}[ \t]*\r?\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


class AnswerError(ValueError):
    """The answer's ``bmad`` block cannot be read."""


@dataclass(frozen=True)
class Declared:
    """What the answer's ``bmad`` block declares."""

    items: list[str] | None = None
    outputs: dict[str, taskwire.OutputValue] = field(default_factory=dict)
    failed: str | None = None


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise AnswerError(f'{where} is {value!r}: items are ids such as "1.1" (quote them)')
    return value if isinstance(value, str) else repr(value)


def parse_answer(text: str) -> tuple[str, Declared]:
    """(the artifact, what the last ``bmad`` block declares); without a block, all of it."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return text.strip(), Declared()
    last = blocks[-1]
    document = (text[: last.start()] + text[last.end() :]).strip()
    try:
        data = yaml.safe_load(last.group(1))
    except yaml.YAMLError as exc:
        raise AnswerError(f"the bmad block is not YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return document, Declared()
    if not isinstance(data, dict):
        raise AnswerError("the bmad block must be a YAML mapping (items, outputs, failed)")
    unknown = sorted(str(k) for k in data if k not in BLOCK_KEYS)
    if unknown:
        raise AnswerError(
            f"the bmad block has key {unknown[0]!r}: it may hold only {', '.join(BLOCK_KEYS)}"
        )
    items: list[str] | None = None
    if "items" in data:
        raw_items = data["items"]
        if not isinstance(raw_items, list):
            raise AnswerError("items in the bmad block must be a list of ids")
        items = [_scalar(item, f"items[{i}]") for i, item in enumerate(raw_items)]
    outputs: dict[str, taskwire.OutputValue] = {}
    raw_outputs = data.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, dict):
            raise AnswerError("outputs in the bmad block must be a mapping of names to values")
        for name, value in raw_outputs.items():
            if not isinstance(value, bool | int | str):
                raise AnswerError(
                    f"output {name!r} is {value!r}: outputs are booleans, integers or short strings"
                )
            outputs[str(name)] = value
    failed = data.get("failed")
    if failed is not None and not isinstance(failed, str):
        failed = str(failed)
    return document, Declared(items=items, outputs=outputs, failed=failed)


def prompt(task: taskwire.AgentTask) -> str:
    """The user message of a step's turn; the artifacts go into the context's layers.

    The step's description comes after everything else the run supplies, so that a
    ``bmad`` block it holds (a scripted demo) is the last one an echo answer repeats.
    """
    where = f"step {task.step}" + (f", item {task.item}" if task.item else "")
    parts = [
        f"Workflow {task.workflow.name} (namespace {task.workflow.namespace}), {where} "
        f"(attempt {task.attempt} of {task.max_attempts})."
    ]
    if task.requires:
        names = ", ".join(
            ref.name + (f" for item {ref.item}" if ref.item else "") for ref in task.requires
        )
        parts.append(f"The workflow artifacts in your context: {names}.")
    if task.inputs:
        dumped = yaml.safe_dump(task.inputs, sort_keys=True, allow_unicode=True).strip()
        parts.append(f"Inputs of the run:\n\n{dumped}")
    target = task.target
    default = f"Write {target.name}." if target else f"Carry out step {task.step}."
    parts.append(f"Your task:\n\n{(task.description or default).strip()}")
    hand_back: list[str] = []
    if target is not None:
        what = "a new version of the artifact" if target.mode == "updates" else "the artifact"
        hand_back.append(
            f"Your answer is stored as {what} {target.name}: answer with the document itself."
        )
    wants = []
    if task.lists_items:
        wants.append(
            "key items: the list of ids your document lists (later steps run once per "
            'id; quote them, for example "1.1")'
        )
    if task.outputs:
        wants.append(
            f"key outputs: the values {', '.join(task.outputs)} (booleans, integers or "
            "short strings)"
        )
    block = f"a fenced code block whose info string is {BLOCK_INFO}, holding YAML with"
    if wants:
        hand_back.append(f"End your answer with {block} {' and '.join(wants)}.")
    hand_back.append(
        f"If you cannot do this step, answer only with {block} key failed: the reason."
    )
    parts.append(" ".join(hand_back))
    return "\n\n".join(parts)


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    parsed = urllib.parse.urlsplit(uri)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise consumer.TaskFailedError(f"artifact URI {uri!r} is not s3://<bucket>/<key>")
    return parsed.netloc, urllib.parse.unquote(key)


class ArtifactStores:
    """The object stores of the objectStorage Integrations bound into this agent."""

    def __init__(self, found: Mapping[str, bindings_mod.Binding], *, tenant: str) -> None:
        self.found = found
        self.tenant = tenant
        self._stores: dict[str, artifacts_mod.ArtifactStore] = {}

    def store(self, integration: str) -> artifacts_mod.ArtifactStore:
        cached = self._stores.get(integration)
        if cached is not None:
            return cached
        binding = self.found.get(integration)
        if binding is None:
            raise consumer.TaskFailedError(
                f"the Workflow stores its artifacts in Integration {integration!r}, which is "
                f"not bound into this agent: add {integration!r} to the Agent's "
                "spec.integrations"
            )
        try:
            settings = binding.settings()
        except bindings_mod.BindingError as exc:
            raise consumer.TaskFailedError(str(exc)) from None
        if not isinstance(settings, bindings_mod.ObjectStorageSettings):
            raise consumer.TaskFailedError(
                f"Integration {integration!r} is of type {binding.type!r}, not objectStorage: "
                "spec.artifacts.integration must name an objectStorage Integration"
            )
        store = artifacts_mod.ArtifactStore(settings, tenant=self.tenant, scope=SCOPE)
        self._stores[integration] = store
        return store

    async def read(self, ref: taskwire.ArtifactRef) -> str:
        if ref.content is not None:
            return ref.content
        if ref.uri is None or ref.integration is None:
            raise consumer.TaskFailedError(
                f"artifact {ref.name} (step {ref.step}) has neither a stored version nor content"
            )
        store = self.store(ref.integration)
        bucket, key = split_uri(ref.uri)
        if bucket != store.bucket:
            raise consumer.TaskFailedError(
                f"artifact {ref.name} is in bucket {bucket!r}, but Integration "
                f"{ref.integration!r} binds bucket {store.bucket!r}"
            )
        try:
            found = await store.get_key(key, ref.version)
        except (artifacts_mod.ArtifactNotFoundError, artifacts_mod.ArtifactKeyError) as exc:
            raise consumer.TaskFailedError(str(exc)) from None
        return found.data.decode("utf-8", errors="replace")

    async def write(
        self,
        integration: str,
        key: str,
        name: str,
        content: str,
        *,
        metadata: Mapping[str, str],
    ) -> taskwire.StoredArtifact:
        store = self.store(integration)
        try:
            version = await store.put_key(
                key, content, content_type=_content_type(name), metadata=metadata
            )
        except artifacts_mod.ArtifactKeyError as exc:
            raise consumer.TaskFailedError(str(exc)) from None
        uri = f"s3://{store.bucket}/{urllib.parse.quote(key)}"
        return taskwire.StoredArtifact(uri=uri, version=version, size=len(content.encode()))

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


def _content_type(name: str) -> str:
    if name.endswith(".md"):
        return "text/markdown; charset=utf-8"
    if name.endswith((".yaml", ".yml")):
        return "application/yaml"
    if name.endswith(".json"):
        return "application/json"
    return "text/plain; charset=utf-8"


def _layer(ref: taskwire.ArtifactRef, text: str) -> context.ArtifactLayer:
    label = ref.name + (f" for item {ref.item}" if ref.item else "") + f" (step {ref.step})"
    if len(text) > ARTIFACT_PROMPT_MAX_CHARS:
        text = text[:ARTIFACT_PROMPT_MAX_CHARS] + "\n\n[... cut: the artifact is longer]"
    return context.ArtifactLayer(name=label, content=text, version=ref.version)


def _summary(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


async def run(
    services: turns.Services, stores: ArtifactStores, task: taskwire.Task
) -> dict[str, Any]:
    """Run one attempt of a workflow step; the result's output (a `StepOutput`)."""
    started = time.perf_counter()
    try:
        step = taskwire.decode_agent_task(task.payload)
    except taskwire.WireError as exc:
        raise consumer.TaskFailedError(str(exc)) from None
    layers = [_layer(ref, await stores.read(ref)) for ref in step.requires]
    body = schemas.InvokeRequest(input=prompt(step))
    caller = ports.Principal(subject=turns.TASK_SUBJECT, tenant=services.tenant)
    try:
        answer = await turns.run(
            services, body, caller, request_id=task.task_id, artifacts=layers, task_id=task.task_id
        )
    except providers_router.AllProvidersFailedError as exc:
        raise consumer.TaskFailedError(exc.message) from None
    except context.ContextOverflowError as exc:
        raise consumer.TaskFailedError(str(exc)) from None
    try:
        document, declared = parse_answer(answer.output)
    except AnswerError as exc:
        raise consumer.TaskFailedError(f"the answer of step {step.step}: {exc}") from None
    if declared.failed is not None:
        raise consumer.TaskFailedError(
            f"the agent could not do step {step.step}: {declared.failed}"
        )
    if step.lists_items and declared.items is None:
        raise consumer.TaskFailedError(
            f"later steps repeat over {step.target.name if step.target else step.step}, but "
            f"the answer lists no items (a {BLOCK_INFO} block with key items)"
        )
    stored: taskwire.StoredArtifact | None = None
    content: str | None = None
    message = f"answered: {_summary(document)}"
    target = step.target
    if target is not None and target.integration is not None and target.key is not None:
        stored = await stores.write(
            target.integration,
            target.key,
            target.name,
            document,
            metadata={"workflow": step.workflow.name, "step": step.step, "task": task.task_id},
        )
        message = f"stored {target.name} version {stored.version} ({stored.size} bytes)"
    elif target is not None:
        if len(document.encode()) > taskwire.INLINE_CONTENT_MAX_BYTES:
            raise consumer.TaskFailedError(
                f"{target.name} is larger than {taskwire.INLINE_CONTENT_MAX_BYTES} bytes, "
                "which a Workflow without spec.artifacts cannot keep: store artifacts in an "
                "objectStorage Integration"
            )
        content = document
        message = f"wrote {target.name} ({len(document.encode())} bytes)"
    try:
        output = taskwire.StepOutput(
            artifact=stored,
            content=content,
            items=declared.items,
            outputs=declared.outputs,
            message=message[: taskwire.MESSAGE_MAX_CHARS],
            tokens_in=answer.usage.tokens_in,
            tokens_out=answer.usage.tokens_out,
            model=answer.model,
            provider=answer.provider,
            latency_ms=int((time.perf_counter() - started) * 1000),
        )
    except pydantic.ValidationError as exc:
        problem = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise consumer.TaskFailedError(f"the answer of step {step.step}: {problem}") from None
    return output.to_payload()

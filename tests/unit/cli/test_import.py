"""`bmad import`: BMAD v4 files in, Agent and Workflow manifests out, or errors naming
the file and the field."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bmad_cli import importer, main
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import workflow as workflow_api
from bmad_operator.workflows import engine, tasks

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "bmad-core"
OPTIONS = importer.Options()


@pytest.fixture(scope="module")
def imported() -> importer.Imported:
    result = importer.import_folder(FIXTURES, OPTIONS)
    assert result.errors == []
    return result


def workflow_of(result: importer.Imported) -> dict[str, Any]:
    return result.workflows["greenfield-service"]


def steps_of(result: importer.Imported) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in workflow_of(result)["spec"]["steps"]}


# --- the fixtures map, and what comes out is valid -------------------------------------


def test_the_fixture_folder_maps_to_seven_agents_and_one_workflow(
    imported: importer.Imported,
) -> None:
    assert sorted(imported.agents) == ["analyst", "architect", "dev", "pm", "po", "qa", "sm"]
    assert list(imported.workflows) == ["greenfield-service"]
    for manifest in imported.agents.values():
        parsed = agent_api.Agent.model_validate(manifest)
        assert parsed.spec.model.provider == "echo"
    parsed_wf = workflow_api.Workflow.model_validate(workflow_of(imported))
    assert len(parsed_wf.spec.steps) == 12


def test_an_agent_keeps_persona_principles_commands_and_dependencies(
    imported: importer.Imported,
) -> None:
    dev = imported.agents["dev"]
    assert dev["metadata"]["name"] == "dev"
    assert dev["spec"]["role"] == "dev"
    assert dev["spec"]["persona"] == {
        "name": "Sam",
        "title": "Software Engineer",
        "style": "Terse, pragmatic, precise",
        "identity": "An engineer who implements one approved story at a time, with tests",
        "focus": "Working code, green tests, an honest story record",
    }
    text = dev["spec"]["instructions"]
    assert "Role: Test-First Software Engineer" in text
    assert "Use this agent for: Implementing stories" in text
    # A core_principles list written at the top level of the block (as real files do).
    assert "- Stop and ask after three failed attempts at the same problem" in text
    # A command with nested rules.
    assert "- develop-story:" in text
    assert "order-of-execution: Take the next task" in text
    assert "- checklists: story-dod-checklist.md" in text
    annotations = dev["metadata"]["annotations"]
    assert annotations["bmad.dev/import-source"] == "agents/dev.md"
    assert annotations["bmad.dev/icon"] == "💻"
    assert annotations["bmad.dev/import-omitted"].startswith("activation-instructions:")


def test_other_agent_keys_become_sections_of_the_instructions(
    imported: importer.Imported,
) -> None:
    qa = imported.agents["qa"]["spec"]["instructions"]
    assert "## story-file-permissions" in qa
    assert "Only edit the QA Results section" in qa
    sm = imported.agents["sm"]["spec"]["instructions"]
    assert "## Customization (takes precedence over the rest)" in sm
    assert "<epic>.<story>" in sm
    analyst = imported.agents["analyst"]["metadata"]["annotations"]
    assert "IDE-FILE-RESOLUTION" in analyst["bmad.dev/import-omitted"]
    assert "REQUEST-RESOLUTION" in analyst["bmad.dev/import-omitted"]


def test_an_agent_id_outside_the_bmad_roles_is_a_custom_agent() -> None:
    text = _agent_file(id_="release-manager")
    manifest = importer.map_agent(text, "agents/release-manager.md", OPTIONS)
    assert manifest["spec"]["role"] == "custom"
    assert manifest["spec"]["instructions"]
    agent_api.Agent.model_validate(manifest)


def test_model_and_namespace_are_options() -> None:
    options = importer.Options(
        model_provider="anthropic", model_name="claude-sonnet-4-5", namespace="team-a"
    )
    manifest = importer.map_agent(_agent_file(), "agents/pm.md", options)
    assert manifest["spec"]["model"] == {"provider": "anthropic", "name": "claude-sonnet-4-5"}
    assert manifest["metadata"]["namespace"] == "team-a"


def test_the_workflow_steps_follow_the_sequence(imported: importer.Imported) -> None:
    steps = steps_of(imported)
    assert list(steps) == [
        "project-brief",
        "prd",
        "architecture",
        "update-prd",
        "validate-all-artifacts",
        "shard-documents",
        "create-story",
        "review-draft-story",
        "implement-story",
        "review-implementation",
        "address-qa-feedback",
        "epic-retrospective",
    ]
    assert steps["prd"] == {
        "id": "prd",
        "agent": "pm",
        "description": "Write the PRD from the brief, focused on the service's API and its "
        "consumers.",
        "creates": "prd.md",
        "requires": ["project-brief.md"],
    }
    # "updates: prd.md (if needed)": the artifact, and the note in the description.
    assert steps["update-prd"]["updates"] == "prd.md"
    assert steps["update-prd"]["description"].startswith("Updates prd.md (if needed).")
    assert steps["update-prd"]["condition"] == (
        "has(inputs.architecture_suggests_prd_changes) && "
        "inputs.architecture_suggests_prd_changes == true"
    )
    # validates: all_artifacts requires everything made so far.
    assert steps["validate-all-artifacts"]["requires"] == [
        "project-brief.md",
        "prd.md",
        "architecture.md",
    ]
    assert "Uses: po-master-checklist." in steps["validate-all-artifacts"]["description"]
    # The step before it writes nothing it reads: it waits for it explicitly.
    assert steps["shard-documents"]["dependsOn"] == ["validate-all-artifacts"]
    assert "dependsOn" not in steps["prd"]
    assert steps["epic-retrospective"]["dependsOn"] == ["address-qa-feedback"]


def test_conditions_become_inputs_that_default_to_false(imported: importer.Imported) -> None:
    assert workflow_of(imported)["spec"]["inputs"] == {
        "architecture_suggests_prd_changes": False,
        "user_wants_story_review": False,
        "qa_left_unchecked_items": False,
        "epic_complete": False,
    }


def test_the_story_cycle_repeats_per_item(imported: importer.Imported) -> None:
    steps = steps_of(imported)
    assert steps["create-story"]["repeat"] == {"over": "sharded_docs"}
    assert steps["create-story"]["requires"] == ["sharded_docs"]
    # Steps reading what a repeated step writes repeat over the same items.
    for step_id in (
        "review-draft-story",
        "implement-story",
        "review-implementation",
        "address-qa-feedback",
    ):
        assert steps[step_id]["repeat"] == {"over": "sharded_docs"}, step_id
    assert "repeat" not in steps["epic-retrospective"]


def test_odd_items_are_notes_in_an_annotation_and_warnings(
    imported: importer.Imported,
) -> None:
    notes = workflow_of(imported)["metadata"]["annotations"]["bmad.dev/import-notes"]
    lines = notes.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("workflow.sequence[5] is kept as a note, not run")
    assert "various" in lines[0]
    assert "po_checklist_issues" in lines[0]
    assert "analyst/pm" in lines[1]
    assert "repeat_development_cycle" in lines[2]
    assert "workflow_end" in lines[3]
    assert [str(w) for w in imported.warnings] == [
        "workflows/greenfield-service.yaml: workflow.sequence[5]: kept as a note, not run: "
        'it names no single agent, only "various"',
        "workflows/greenfield-service.yaml: workflow.sequence[8].agent: analyst/pm: the step "
        "runs on analyst",
        "workflows/greenfield-service.yaml: workflow.sequence[12]: kept as a note, not run: "
        "it names no agent",
        "workflows/greenfield-service.yaml: workflow.sequence[14]: kept as a note, not run: "
        "it names no agent",
    ]
    assert steps_of(imported)["review-draft-story"]["agent"] == "analyst"


def test_the_imported_workflow_runs_to_the_end_in_the_engine(
    imported: importer.Imported,
) -> None:
    """Two epics, every agent answering: the run succeeds, stories cycle one by one."""
    body = dict(workflow_of(imported))
    body["metadata"] = {**body["metadata"], "uid": "u-1", "namespace": "demo", "generation": 1}
    wf = workflow_api.Workflow.model_validate(body)
    now = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    results: dict[str, tasks.Result] = {}
    order: list[tuple[str, str | None]] = []
    for _ in range(60):
        decision = engine.decide(wf, results=results, now=now)
        wf.status = decision.status
        if decision.status.phase in engine.TERMINAL:
            break
        for d in decision.dispatch:
            order.append((d.step, d.item))
            items = ("epic-1", "epic-2") if d.step == "shard-documents" else None
            results[d.task_id] = tasks.Result(task_id=d.task_id, succeeded=True, items=items)
        now += dt.timedelta(seconds=1)
    assert wf.status is not None
    assert wf.status.phase == "Succeeded"
    phases = {s.id: s.phase for s in wf.status.steps or []}
    assert phases["update-prd"] == "Skipped"  # its input defaults to false
    assert phases["review-draft-story"] == "Skipped"
    assert phases["implement-story"] == "Succeeded"
    assert order.index(("implement-story", "epic-1")) < order.index(
        ("review-implementation", "epic-1")
    )
    assert order.count(("implement-story", "epic-1")) == 1
    assert sum(1 for step, _ in order if step == "review-implementation") == 2


# --- what cannot be mapped is an error naming file and field ---------------------------


def _agent_file(*, id_: str = "pm", extra: str = "", persona: str | None = None) -> str:
    persona_block = persona or textwrap.indent(
        "role: Planner\nstyle: Brief\nidentity: A planner\nfocus: Plans", "  "
    )
    return (
        "# agent\n\n```yaml\n"
        f"agent:\n  name: Pat\n  id: {id_}\n  title: Planner\n{extra}"
        f"persona:\n{persona_block}\n"
        "commands:\n  - help: List commands\n"
        "```\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# no block here\n", "agents/x.md: yaml block: no ```yaml block"),
        (
            "```yaml\nagent: [unclosed\n```\n",
            "agents/x.md: yaml block, line 2: is not valid YAML",
        ),
        ("```yaml\npersona: {}\n```\n", "agents/x.md: agent: is missing"),
        (_agent_file(id_="Product Manager"), "agents/x.md: agent.id: 'Product Manager' cannot"),
        (_agent_file(extra="  favourite: tea\n"), "agents/x.md: agent.favourite: is not a field"),
        (
            _agent_file(persona="  style: " + "x" * 5000),
            "agents/x.md: persona.style: is 5000 characters long, at most 4096",
        ),
        (_agent_file(persona="  - a list"), "agents/x.md: persona: expected a mapping"),
        (
            _agent_file().replace("commands:\n  - help: List commands\n", "commands: 3\n"),
            "agents/x.md: commands: expected a list",
        ),
        (
            _agent_file().replace(
                "commands:\n  - help: List commands\n", "dependencies:\n  tasks: a.md\n"
            ),
            "agents/x.md: dependencies.tasks: expected a list of file names",
        ),
    ],
)
def test_a_malformed_agent_file_gets_an_error_naming_file_and_field(
    text: str, expected: str
) -> None:
    with pytest.raises(importer.ImportProblem) as caught:
        importer.map_agent(text, "agents/x.md", OPTIONS)
    assert str(caught.value).startswith(expected), str(caught.value)


def _workflow_file(sequence: str, *, head: str = "") -> str:
    return f"workflow:\n  id: wf\n{head}  sequence:\n" + textwrap.indent(
        textwrap.dedent(sequence), "    "
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("workflow: [\n", "workflows/x.yaml: line 2: is not valid YAML"),
        ("flow: {}\n", "workflows/x.yaml: workflow: is missing"),
        (_workflow_file("- agent: pm\n", head="  owner: me\n"), "workflows/x.yaml: workflow.owner"),
        (
            _workflow_file("- agent: pm\n").replace("id: wf", "id: My Flow"),
            "workflows/x.yaml: workflow.id: 'My Flow' cannot name a Workflow",
        ),
        (
            _workflow_file(
                """\
                - agent: analyst
                  creates: brief.md
                - step: routing
                  routes:
                    small: {agent: pm}
                """
            ),
            "workflows/x.yaml: workflow.sequence[1].routes: a choice between routes cannot be",
        ),
        (
            _workflow_file("- agent: pm\n  creates: prd.md\n  owner: me\n"),
            "workflows/x.yaml: workflow.sequence[0].owner: is not a field",
        ),
        (
            _workflow_file("- agent: pm\n  creates: prd.md\n  requires: existing_docs\n"),
            "workflows/x.yaml: workflow.sequence[0].requires: 'existing_docs' is created by no",
        ),
        (
            _workflow_file("- agent: pm\n  creates: many documents (see notes)\n"),
            "workflows/x.yaml: workflow.sequence[0].creates: 'many documents (see notes)' cannot",
        ),
        (
            _workflow_file("- agent: pm\n  updates: prd.md\n"),
            "workflows/x.yaml: workflow.sequence[0].updates: 'prd.md' is created by no earlier",
        ),
        (
            _workflow_file("- agent: sm\n  creates: story.md\n  repeats: for_each_epic\n"),
            "workflows/x.yaml: workflow.sequence[0].repeats: for_each_epic repeats over",
        ),
        (
            _workflow_file("- agent: sm\n  repeats: twice\n"),
            "workflows/x.yaml: workflow.sequence[0].repeats: 'twice'",
        ),
        (
            _workflow_file("- agent: pm\n  condition: if the user wants\n"),
            "workflows/x.yaml: workflow.sequence[0].condition: 'if the user wants' is not",
        ),
        (
            _workflow_file("- agent: pm\n  optional: maybe\n"),
            "workflows/x.yaml: workflow.sequence[0].optional: expected true or false",
        ),
        (
            _workflow_file("- agent: various\n  creates: fixes.md\n"),
            "workflows/x.yaml: workflow.sequence[0].agent: a step that creates",
        ),
        (
            _workflow_file("- agent: devops\n"),
            "workflows/x.yaml: workflow.sequence[0].agent: no agents/devops.md in the folder",
        ),
        (
            _workflow_file("- step: the_end\n"),
            "workflows/x.yaml: workflow.sequence: has no step with an agent to run",
        ),
        (
            _workflow_file("- agent: pm\n  notes: '" + "n" * 5000 + "'\n"),
            "workflows/x.yaml: workflow.sequence[0].notes: the step's description would be",
        ),
    ],
)
def test_a_malformed_workflow_file_gets_an_error_naming_file_and_field(
    text: str, expected: str
) -> None:
    with pytest.raises(importer.ImportProblem) as caught:
        importer.map_workflow(text, "workflows/x.yaml", OPTIONS, agents={"pm", "analyst", "sm"})
    assert str(caught.value).startswith(expected), str(caught.value)


def test_collective_requirements_wait_for_steps_that_may_not_run() -> None:
    text = _workflow_file(
        """\
        - agent: pm
          creates: prd.md
        - agent: pm
          creates: extras.md
          condition: wants_extras
        - agent: pm
          validates: all_artifacts
        """
    )
    manifest, _ = importer.map_workflow(text, "workflows/x.yaml", OPTIONS, agents={"pm"})
    validate = manifest["spec"]["steps"][2]
    assert validate["requires"] == ["prd.md"]
    assert validate["dependsOn"] == ["extras"]


# --- the command ------------------------------------------------------------------------


def test_the_command_writes_yaml_to_stdout() -> None:
    result = CliRunner().invoke(main.app, ["import", str(FIXTURES)])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs][-1] == (
        "Workflow",
        "greenfield-service",
    )
    assert len(docs) == 8
    assert "warning: workflows/greenfield-service.yaml: workflow.sequence[5]" in result.stderr


def test_the_command_writes_one_file_per_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main.app,
        ["import", str(FIXTURES), "-o", str(out), "--provider", "openai", "--model", "gpt-4o"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "agent-analyst.yaml",
        "agent-architect.yaml",
        "agent-dev.yaml",
        "agent-pm.yaml",
        "agent-po.yaml",
        "agent-qa.yaml",
        "agent-sm.yaml",
        "workflow-greenfield-service.yaml",
    ]
    pm = yaml.safe_load((out / "agent-pm.yaml").read_text())
    assert pm["spec"]["model"] == {"provider": "openai", "name": "gpt-4o"}


def test_the_command_writes_nothing_when_a_file_cannot_be_mapped(tmp_path: Path) -> None:
    core = tmp_path / "bmad-core"
    (core / "agents").mkdir(parents=True)
    (core / "workflows").mkdir()
    (core / "agents" / "pm.md").write_text(_agent_file())
    (core / "agents" / "broken.md").write_text("no yaml here\n")
    (core / "workflows" / "plan.yaml").write_text(
        _workflow_file("- agent: pm\n  creates: prd.md\n")
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main.app, ["import", str(core), "-o", str(out)])
    assert result.exit_code == 1
    assert "error: agents/broken.md: yaml block: no ```yaml block" in result.stderr
    assert not out.exists()

    kept = CliRunner().invoke(main.app, ["import", str(core), "-o", str(out), "--keep-going"])
    assert kept.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["agent-pm.yaml", "workflow-wf.yaml"]


def test_the_command_refuses_a_folder_without_bmad_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(main.app, ["import", str(tmp_path)])
    assert result.exit_code == 1
    assert "has neither agents/ nor workflows/" in result.stderr
    unknown = CliRunner().invoke(main.app, ["import", str(FIXTURES), "--workflow", "nope"])
    assert unknown.exit_code == 1
    assert "nope.yaml: file: no such workflow in the folder" in unknown.stderr
    bad_provider = CliRunner().invoke(main.app, ["import", str(FIXTURES), "--provider", "x"])
    assert bad_provider.exit_code == 2

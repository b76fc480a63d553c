"""The `bmad` command: one entry point for the operator, the runtime and the test bed.

Sub-commands import their package lazily, so `bmad testbed up` does not pay for
kopf and `bmad operator` does not pay for the test bed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
testbed_app = typer.Typer(
    no_args_is_help=True,
    help="A real Kubernetes control plane and real services on loopback, built and cached.",
)
app.add_typer(testbed_app, name="testbed")
operator_app = typer.Typer(no_args_is_help=True, help="The BMAD operator.")
app.add_typer(operator_app, name="operator")
workflow_app = typer.Typer(no_args_is_help=True, help="Workflows running in the cluster.")
app.add_typer(workflow_app, name="workflow")


@app.command("import")
def cmd_import(
    folder: Annotated[
        Path,
        typer.Argument(help="A BMAD-METHOD v4 bmad-core folder (with agents/ and workflows/)."),
    ],
    *,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write one file per manifest into this folder."),
    ] = None,
    workflow: Annotated[
        list[str] | None,
        typer.Option(
            "--workflow",
            "-w",
            help="Import only this workflow (repeatable) and the agents it uses.",
        ),
    ] = None,
    provider: Annotated[str, typer.Option(help="Model provider of the imported Agents.")] = "echo",
    model: Annotated[str, typer.Option(help="Model name of the imported Agents.")] = "echo-1",
    artifacts: Annotated[
        str | None,
        typer.Option(help="objectStorage Integration the imported Workflows store artifacts in."),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("-n", "--namespace", help="Namespace written into each manifest.")
    ] = None,
    keep_going: Annotated[
        bool,
        typer.Option(help="Write what maps even when some files do not (still exit 1)."),
    ] = False,
) -> None:
    """Turn BMAD-METHOD v4 agent and workflow files into Agent and Workflow manifests.

    YAML goes to stdout, or into --output as agent-<name>.yaml and workflow-<name>.yaml.
    Anything that cannot be mapped is an error naming the file and the field; items
    kept only as notes are listed as warnings (and in the Workflow's annotations).
    """
    from bmad_cli import importer
    from bmad_crds.v1alpha1 import agent as agent_api

    if provider not in agent_api.MODEL_PROVIDERS:
        typer.echo(
            f"error: --provider {provider!r}: use one of {', '.join(agent_api.MODEL_PROVIDERS)}",
            err=True,
        )
        raise typer.Exit(2)
    options = importer.Options(
        model_provider=provider,
        model_name=model,
        artifacts_integration=artifacts,
        namespace=namespace,
    )
    result = importer.import_folder(folder, options, workflows=workflow)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for error in result.errors:
        typer.echo(f"error: {error}", err=True)
    if result.errors and not keep_going:
        typer.echo("nothing written: fix the errors above, or pass --keep-going", err=True)
        raise typer.Exit(1)
    manifests = result.manifests()
    if output is None:
        sys.stdout.write("---\n".join(importer.render(m) for _, m in manifests))
    else:
        output.mkdir(parents=True, exist_ok=True)
        for name, manifest in manifests:
            (output / name).write_text(importer.render(manifest), encoding="utf-8")
        typer.echo(f"wrote {len(manifests)} manifests to {output}", err=True)
    if result.errors:
        raise typer.Exit(1)


@workflow_app.command("approve")
def cmd_workflow_approve(
    name: Annotated[str, typer.Argument(help="The Workflow.")],
    step: Annotated[str, typer.Argument(help="The id of the step to approve.")],
    namespace: Annotated[
        str | None,
        typer.Option("-n", "--namespace", help="Namespace (default: the current context's)."),
    ] = None,
) -> None:
    """Approve a step: add its id to spec.approvals, as the current kubeconfig user.

    When the step names approvers, the operator's admission check refuses the edit
    unless you are one of them (or in one of their groups).
    """
    import asyncio

    from bmad_cli import workflows

    outcome = asyncio.run(workflows.run_approve(namespace=namespace, name=name, step=step))
    typer.echo(outcome.message if outcome.ok else f"error: {outcome.message}", err=not outcome.ok)
    if not outcome.ok:
        raise typer.Exit(1)


@app.command("runtime")
def cmd_runtime() -> None:
    """Run the agent runtime (what every agent pod runs), configured from the environment."""
    from bmad_runtime import main as runtime_main

    runtime_main.run()


@operator_app.command("run")
def cmd_operator_run() -> None:
    """Run the operator against the cluster of KUBECONFIG (or in-cluster)."""
    from bmad_operator import main as operator_main

    operator_main.run()


@testbed_app.command("build")
def cmd_build() -> None:
    """Build (or find in the cache) every binary and base image the test bed starts."""
    from bmad_testbed import build, images

    try:
        found = build.ensure_all()
        found["pause-image"] = images.ensure_pause().path
        found["base-image"] = images.ensure_base().path
    except (build.BuildError, images.ImageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, path in sorted(found.items()):
        typer.echo(f"{name}={path}")


@testbed_app.command("up")
def cmd_up(
    cluster: Annotated[
        bool, typer.Option("--cluster/--no-cluster", help="Start (or use) a control plane.")
    ] = True,
    services: Annotated[
        str,
        typer.Option(
            help="Comma-separated services: postgres,redis,prometheus,minio,stripe,smtp; "
            "'all' or 'none'."
        ),
    ] = "all",
    nodes: Annotated[int, typer.Option(min=1, max=500, help="Number of kwok nodes.")] = 3,
    real_node: Annotated[
        bool,
        typer.Option(
            "--real-node",
            help="Also start a real node (kubelet, containerd, kube-proxy, kube-router) in a "
            "network namespace of its own; the kwok nodes are then tainted. One per machine.",
        ),
    ] = False,
    export: Annotated[bool, typer.Option(help="Print `export KEY=value` lines.")] = False,
) -> None:
    """Start the test bed in the background; print KEY=value lines for `eval`."""
    from bmad_testbed import build, images, nodenet, procs, testbed
    from bmad_testbed import services as svc

    if services == "all":
        wanted: list[str] = list(svc.ALL_SERVICES)
    elif services in ("none", ""):
        wanted = []
    else:
        wanted = [s.strip() for s in services.split(",") if s.strip()]
    try:
        env = testbed.up(
            with_cluster=cluster, with_services=wanted, nodes=nodes, real_node=real_node
        )
    except (
        build.BuildError,
        images.ImageError,
        nodenet.NetworkError,
        procs.StartupError,
        ValueError,
    ) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.write(testbed.format_env(env, export=export))


@testbed_app.command("image")
def cmd_image(
    load: Annotated[
        bool,
        typer.Option("--load/--no-load", help="Import it into the running test bed's real node."),
    ] = True,
) -> None:
    """Build the project's image from the Dockerfile (offline, cached by content)."""
    from pathlib import Path

    from bmad_testbed import build, images, procs, testbed

    repo = Path.cwd()
    if not (repo / "Dockerfile").exists():
        typer.echo("error: run this in the repository (no Dockerfile here)", err=True)
        raise typer.Exit(1)
    try:
        archive = testbed.load_image(repo=repo) if load else images.ensure_project_image(repo)
    except (build.BuildError, images.ImageError, procs.StartupError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{archive.ref} {archive.path}")


@testbed_app.command("start-operator")
def cmd_start_operator(
    kubeconfig: Annotated[
        str, typer.Option(envvar="BMAD_OPERATOR_KUBECONFIG", help="The operator's kubeconfig.")
    ],
) -> None:
    """Run the operator in the background as part of the test bed (`down` stops it)."""
    from bmad_testbed import procs, testbed

    try:
        rec = testbed.start_operator(kubeconfig=kubeconfig)
    except procs.StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"the operator runs as pid {rec['pid']}; log: {rec['log']}", err=True)


@testbed_app.command("down")
def cmd_down(
    keep_data: Annotated[bool, typer.Option(help="Keep logs and data directories.")] = False,
) -> None:
    """Stop everything `up` started; nothing of ours keeps running."""
    from bmad_testbed import testbed

    stopped = testbed.down(keep_data=keep_data)
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}", err=True)


@testbed_app.command("status")
def cmd_status() -> None:
    """Show what runs, as JSON."""
    from bmad_testbed import testbed

    state = testbed.status()
    if state is None:
        typer.echo("the test bed is not up", err=True)
        raise typer.Exit(1)
    shown = [
        {"name": r["name"], "pid": r["pid"], "alive": alive, "log": r["log"]}
        for r, alive in zip(state["records"], state["alive"], strict=True)
    ]
    typer.echo(json.dumps(shown, indent=2))


@testbed_app.command("env")
def cmd_env(
    export: Annotated[bool, typer.Option(help="Print `export KEY=value` lines.")] = False,
) -> None:
    """Print the KEY=value lines of the running test bed."""
    from bmad_testbed import testbed

    state = testbed.status()
    if state is None:
        typer.echo("the test bed is not up: run `bmad testbed up`", err=True)
        raise typer.Exit(1)
    sys.stdout.write(testbed.format_env(state["env"], export=export))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

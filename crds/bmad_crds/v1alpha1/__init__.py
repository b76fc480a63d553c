"""``bmad.dev/v1alpha1``: the Agent, Integration, Workflow and Tenant kinds.

One module per kind (``agent``, ``integration``, ``workflow``, ``tenant``) plus the
shared pieces (``common``). Import the module, then the name::

    from bmad_crds.v1alpha1 import agent
    spec = agent.AgentSpec.model_validate(body["spec"])

The root models and kind descriptions are re-exported here for convenience.
"""

from bmad_crds.v1alpha1 import agent, common, examples, integration, tenant, workflow
from bmad_crds.v1alpha1.agent import Agent, AgentSpec, AgentStatus
from bmad_crds.v1alpha1.common import API_VERSION, GROUP, VERSION, Condition
from bmad_crds.v1alpha1.integration import Integration, IntegrationSpec, IntegrationStatus
from bmad_crds.v1alpha1.tenant import Tenant, TenantSpec, TenantStatus
from bmad_crds.v1alpha1.workflow import Workflow, WorkflowSpec, WorkflowStatus

KINDS: tuple[common.Kind, ...] = (agent.KIND, integration.KIND, workflow.KIND, tenant.KIND)
"""Every kind of this version, in the order the CRDs are rendered."""

ROOT_MODELS: dict[str, type[common.Resource]] = {
    "Agent": Agent,
    "Integration": Integration,
    "Workflow": Workflow,
    "Tenant": Tenant,
}
"""The root model of each kind, by kind name."""

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "ROOT_MODELS",
    "VERSION",
    "Agent",
    "AgentSpec",
    "AgentStatus",
    "Condition",
    "Integration",
    "IntegrationSpec",
    "IntegrationStatus",
    "Tenant",
    "TenantSpec",
    "TenantStatus",
    "Workflow",
    "WorkflowSpec",
    "WorkflowStatus",
    "agent",
    "common",
    "examples",
    "integration",
    "tenant",
    "workflow",
]

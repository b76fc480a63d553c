"""LLM providers: OpenAI-compatible, Anthropic, deterministic echo/scripted, and the router.

`router.build` makes an agent's model chain from its config and bindings;
`router.ModelRouter` is what the HTTP app talks to.
"""

"""The runtime's HTTP layer: dependencies, errors, middlewares and one router per resource.

Routes (`api.routes.*`) import `api.deps` and `api.errors`, never the app; the app
(`bmad_runtime.app`) includes the routers. Nothing here runs a turn itself: the
invoke route calls the use case in `bmad_runtime.turns`.
"""

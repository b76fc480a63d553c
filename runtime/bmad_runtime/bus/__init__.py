"""The consumer's side of the task bus: run every task at least once, answer it once.

Work that does not come in over HTTP (workflow steps, fan-out per story, retries the
operator schedules) arrives as tasks on the agent's Redis stream, in the format of
`bmad_integrations.taskwire` (producers use `bmad_integrations.taskbus`). Each Agent
has one stream and one consumer group, shared by all its replicas. A consumer group
hands every entry to one consumer and keeps it *pending* until it is acknowledged,
so a replica that dies (OOM kill, node loss, SIGKILL) leaves its entries behind; the
survivors take them over with XAUTOCLAIM once they have been idle for `min_idle_ms`.
A live consumer resets the idle time of the entries it is running (a heartbeat), so
only a dead or cut-off consumer's entries go idle, however long a task takes.
Delivery is therefore at-least-once, and a task runs twice only when its first
consumer stopped (or lost Redis) in the middle of it.

The *result* is still written exactly once. The result lives under the task id, and
the Lua script that stores it sets the key only if it is absent (``SET NX``) and
acknowledges the entry in the same atomic step. A second run of the same task finds
the result there, leaves it alone and only acks.

The delivery count that the group keeps per pending entry is the attempt number. A
handler that raises leaves its entry pending; it is retried when reclaimed (so
`min_idle_ms` is also the retry delay), and the attempt that reaches `max_attempts`
moves the entry to the dead-letter stream with the error (and stores a ``failed``
result, so waiters stop waiting). An entry that is reclaimed more than
`max_attempts` times without ever finishing (its consumers keep dying) is
dead-lettered without running again.

Acked entries are deleted from the stream in the same script (XDEL), so the stream
holds exactly the tasks without a result: XLEN is the queue depth, waiting plus in
flight, which is what the autoscaler scales on.

Modules: `scripts` (the Lua that finishes and dead-letters atomically), `client`
(the Redis commands of one agent's bus: read, claim, finish, dead-letter) and
`consumer` (the loop: concurrency, heartbeats, retries, graceful shutdown).
"""

"""The consumer's Lua scripts: finishing and dead-lettering a task, each in one step.

Each script writes the result only if none is there yet (``SET NX``), and
acknowledges and deletes the stream entry whatever happened, so a task that ran twice
keeps its first result and leaves the stream exactly once.
"""

from __future__ import annotations

# KEYS: result, stream, submitted marker. ARGV: group, message id, result, ttl ms.
# The result is written only if absent; the entry is acked (and deleted) either way.
FINISH = """
local written = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if written then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return 1
end
return 0
"""

# KEYS: result, stream, dead, submitted marker.
# ARGV: group, message id, failed result, ttl ms, dead-letter maxlen, then the dead
# letter's fields and values. A task that already has a result is only acked.
DEAD = """
local written = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4])
if written then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if written then return 1 end
return 0
"""

# KEYS: stream. ARGV: group, consumer, then message ids. Resets the idle time of each
# entry this consumer still holds (XCLAIM with min-idle 0 and JUSTID does not count a
# delivery), and leaves alone what another consumer took over or what was acked.
# Returns the ids still held.
HEARTBEAT = """
local held = {}
for i = 3, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
"""

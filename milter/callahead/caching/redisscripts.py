"""The Lua scripts the shared cache runs in Redis (redisstore.py calls them): each one
round trip, atomic, and each checks what it reads (untrusted.py says why).

What is checked: a valid entry holds ``1`` and has at most its cap (ARGV) left, else it
is ignored, or its TTL is cut to the cap; a lock holds a token of 32 hex digits and
lives at most its cap, else it is removed, or its TTL is cut. No command meets a key of
another type (a forged one would make every call fail, and open the breaker).
"""

from __future__ import annotations

_CHECKS = """
local function text(key)
  if redis.call('TYPE', key)['ok'] ~= 'string' then return false end
  return redis.call('GET', key)
end
-- {ms left (-2: none to use), problem (0; 1: not an entry callahead writes; 2: its TTL
-- was over the cap, now cut to it), ms left as found}
local function entry(key, cap)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return -2, 0, -2 end
  local found = redis.call('PTTL', key)
  if kind ~= 'string' or redis.call('GET', key) ~= '1' then return -2, 1, found end
  if found < 0 or found > tonumber(cap) then
    redis.call('PEXPIRE', key, cap)
    return tonumber(cap), 2, found
  end
  return found, 0, found
end
-- {1 if a lock is held, problem (0; 1: not a token callahead writes, removed; 2: its
-- TTL was over the cap, now cut to it)}
local function lock(key, cap)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return 0, 0 end
  local token = text(key)
  if token and string.len(token) == 32 and not string.find(token, '[^0-9a-f]') then
    local left = redis.call('PTTL', key)
    if left < 0 or left > tonumber(cap) then
      redis.call('PEXPIRE', key, cap)
      return 1, 2
    end
    return 1, 0
  end
  redis.call('DEL', key)
  return 0, 1
end
"""
# Look up KEYS[1] (valid, capped at ARGV[4] ms); when it is missing, or has less than
# ARGV[3] ms left (refresh ahead), take KEYS[2] (lock, capped at ARGV[2] ms) with token
# ARGV[1] for ARGV[2] ms. Returns {ms left (-2: missing), 1 if the lock was taken, the
# entry's problem, its ms left as found, the lock's problem}.
CLAIM = (
    _CHECKS
    + """
local left, problem, found = entry(KEYS[1], ARGV[4])
if left > 0 and left >= tonumber(ARGV[3]) then return {left, 0, problem, found, 0} end
local held, wrong = lock(KEYS[2], ARGV[2])
if held == 0 and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {left, 1, problem, found, wrong}
end
return {left, 0, problem, found, wrong}
"""
)
# Another backup's probe: {ms left of KEYS[1] (valid, capped at ARGV[1] ms), 1 if KEYS[2]
# (lock, capped at ARGV[2] ms) is held, the entry's problem, its ms left as found, the
# lock's problem}.
POLL = (
    _CHECKS
    + """
local left, problem, found = entry(KEYS[1], ARGV[1])
local held, wrong = lock(KEYS[2], ARGV[2])
return {left, held, problem, found, wrong}
"""
)
# The valid entry KEYS[1], capped at ARGV[1] ms: {ms left, problem, ms left as found}.
ENTRY = (
    _CHECKS
    + """
local left, problem, found = entry(KEYS[1], ARGV[1])
return {left, problem, found}
"""
)
# Store KEYS[1] (valid) for ARGV[1] ms and the address ARGV[3] as its domain's control
# KEYS[3], then release KEYS[2] (lock) if it holds ARGV[2]: in this order, so that
# whoever takes the lock next finds the entry.
PUBLISH_VALID = (
    _CHECKS
    + """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[1])
if ARGV[2] ~= '' and text(KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""
)
# Release KEYS[1] (lock) if it still holds ARGV[1] (not a later holder's).
RELEASE = (
    _CHECKS
    + """
if text(KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)
# The control address KEYS[1]: {its type, its value if a string}.
CONTROL = (
    _CHECKS
    + """
return {redis.call('TYPE', KEYS[1])['ok'], text(KEYS[1]) or ''}
"""
)

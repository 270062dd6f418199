-- Leave (optionally) and count a room's presence. Times in milliseconds (Redis clock). Loaded
-- after the now_ms.lua and presence.lua preludes.
-- KEYS[1]  presence sorted set: connection id -> expiry
-- KEYS[2]  peak viewers
-- ARGV[1]  connection id that leaves, or '' to only count
-- Returns {online, peak}
local presence, peak_key = KEYS[1], KEYS[2]
local leaving = ARGV[1]

local now = now_ms()

if leaving ~= '' then
  redis.call('ZREM', presence, leaving)
end
redis.call('ZREMRANGEBYSCORE', presence, '-inf', now)
-- The peak is raised here too: connections a heartbeat added back (Redis restarted without its
-- data) count toward it.
local online, peak = count(presence, peak_key)
return {online, peak}

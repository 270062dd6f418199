-- A connection joins a room's presence. Times in milliseconds (Redis clock). Loaded after the
-- now_ms.lua and presence.lua preludes.
-- KEYS[1]  presence sorted set: connection id -> expiry
-- KEYS[2]  peak viewers
-- KEYS[3]  unique viewers (HyperLogLog)
-- ARGV[1]  connection id
-- ARGV[2]  ttl: the connection counts until now + ttl unless refreshed
-- ARGV[3]  viewer id for the unique count, or '' for anonymous
-- Returns {online, peak}
local presence, peak_key, uv = KEYS[1], KEYS[2], KEYS[3]
local conn, ttl, viewer = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local now = now_ms()

-- Connections of a process that died stop being refreshed and fall out here.
redis.call('ZREMRANGEBYSCORE', presence, '-inf', now)
redis.call('ZADD', presence, now + ttl, conn)
local online, peak = count(presence, peak_key)
if viewer ~= '' then
  redis.call('PFADD', uv, viewer)
end
return {online, peak}

-- Leave (optionally) and count a room's presence. Times in milliseconds (Redis clock).
-- KEYS[1]  presence sorted set: connection id -> expiry
-- KEYS[2]  peak viewers
-- ARGV[1]  connection id that leaves, or '' to only count
-- Returns {online, peak}
local presence, peak_key = KEYS[1], KEYS[2]
local leaving = ARGV[1]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if leaving ~= '' then
  redis.call('ZREM', presence, leaving)
end
redis.call('ZREMRANGEBYSCORE', presence, '-inf', now)
local online = redis.call('ZCARD', presence)
local peak = tonumber(redis.call('GET', peak_key)) or 0
if online > peak then
  -- Connections added back by a heartbeat (Redis restarted without its data) count too.
  peak = online
  redis.call('SET', peak_key, peak)
end
return {online, peak}

-- A room's presence counted, with its peak raised to the count: a prelude (server/backends/lua.py) of
-- the presence scripts, so a join and a recount (after a heartbeat added connections back) keep
-- the peak alike.
-- count(presence, peak_key) -> online, peak
local function count(presence, peak_key)
  local online = redis.call('ZCARD', presence)
  local peak = tonumber(redis.call('GET', peak_key)) or 0
  if online > peak then
    peak = online
    redis.call('SET', peak_key, peak)
  end
  return online, peak
end

-- The Redis server's clock in milliseconds: every process reads the same one. A prelude
-- (server/backends/lua.py) of the scripts that keep time.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

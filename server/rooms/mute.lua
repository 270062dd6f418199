-- Mute a user in a room until a time; the mutes that ran out are dropped on the way, and a room
-- holds at most ARGV[3] mutes at once. Times in milliseconds (Redis clock). Loaded after
-- the now_ms.lua prelude.
-- KEYS[1]  mutes hash: user id -> muted until
-- ARGV[1]  user id
-- ARGV[2]  muted for this many ms from now
-- ARGV[3]  most mutes a room may hold
-- Returns the muted-until time, or 0 if the room holds too many mutes
local mutes, user, duration, most = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local now = now_ms()

local all = redis.call('HGETALL', mutes)
local held = 0
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= now then
    redis.call('HDEL', mutes, all[i])
  elseif all[i] ~= user then
    held = held + 1
  end
end
if held >= most then
  return 0
end
redis.call('HSET', mutes, user, now + duration)
return now + duration

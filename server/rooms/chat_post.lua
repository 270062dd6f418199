-- Post a danmaku message: refuse a muted sender, else record and publish it.
-- Times in milliseconds (Redis clock).
-- KEYS[1]  mutes hash: user id -> muted until
-- KEYS[2]  history list (newest first)
-- KEYS[3]  chat message counter
-- KEYS[4]  the room's pub/sub channel
-- KEYS[5]  this call's done marker (the message's id): a retry of a call that ran posts nothing more
-- ARGV[1]  sender's user id
-- ARGV[2]  the chat event, JSON
-- ARGV[3]  publish command: SPUBLISH or PUBLISH
-- ARGV[4]  history length to keep
-- Returns {1, 0} when posted, {0, muted_until} when the sender is muted
local mutes, history, counter, channel, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, event, publish, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

if redis.call('EXISTS', done) == 1 then
  return {1, 0}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local muted_until = tonumber(redis.call('HGET', mutes, user))
if muted_until then
  if muted_until > now then
    return {0, muted_until}
  end
  redis.call('HDEL', mutes, user)
end

redis.call('LPUSH', history, event)
redis.call('LTRIM', history, 0, keep - 1)
redis.call('INCR', counter)
redis.call(publish, channel, 'A' .. event)
redis.call('SET', done, 1, 'PX', 20000)  -- outlives the client's retries (3 tries of a 5 s timeout)
return {1, 0}

-- Post a danmaku message: spend from the sender's rate limit, refuse a banned word or a muted
-- sender (and tell the host), else record and publish it. All of a message's checks in one
-- step, so a message costs one round trip. Times in milliseconds (Redis clock). Loaded after the
-- now_ms.lua and gcra.lua preludes.
-- KEYS[1]  mutes hash: user id -> muted until
-- KEYS[2]  history list (newest first)
-- KEYS[3]  chat message counter
-- KEYS[4]  the room's pub/sub channel
-- KEYS[5]  this call's done marker (the message's id): a retry of a call that ran answers what it
--          answered, and does nothing more
-- KEYS[6]  the sender's chat rate-limit bucket in this room
-- ARGV[1]  sender's user id
-- ARGV[2]  the chat event, JSON
-- ARGV[3]  the chat_rejected event the host gets if the message is refused, JSON (its reason:
--          banned_word when ARGV[4] is 1, else muted)
-- ARGV[4]  1 if the text holds one of the room's banned words (the caller compares them: they are
--          folded as Python folds text), else 0
-- ARGV[5]  publish command: SPUBLISH or PUBLISH
-- ARGV[6]  history length to keep
-- ARGV[7]  rate limit: ms per message
-- ARGV[8]  rate limit: burst
-- Returns {status, n}: {'posted', 0}, {'rate_limited', retry after ms}, {'banned_word', 0},
--   {'muted', muted until}
local mutes, history, counter, channel, done, bucket = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local user, event, rejected, banned = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local publish, keep, interval, burst = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local answered = redis.call('HMGET', done, 'status', 'n')
if answered[1] then
  return {answered[1], tonumber(answered[2])}
end

local now = now_ms()
local new_tat, wait = gcra(bucket, interval, burst, 1, now)
if wait > 0 then
  return {'rate_limited', wait}  -- nothing written: a retry may run it again
end
gcra_spend(bucket, new_tat, now)

-- Every answer from here is remembered: it outlives the client's retries (3 tries of a 5 s timeout).
local function answer(status, n)
  redis.call('HSET', done, 'status', status, 'n', n)
  redis.call('PEXPIRE', done, 20000)
  return {status, n}
end

if banned then
  redis.call(publish, channel, 'H' .. rejected)
  return answer('banned_word', 0)
end
local muted_until = tonumber(redis.call('HGET', mutes, user))
if muted_until then
  if muted_until > now then
    redis.call(publish, channel, 'H' .. rejected)
    return answer('muted', muted_until)
  end
  redis.call('HDEL', mutes, user)
end

redis.call('LPUSH', history, event)
redis.call('LTRIM', history, 0, keep - 1)
redis.call('INCR', counter)
redis.call(publish, channel, 'A' .. event)
return answer('posted', 0)

-- Add one tick's likes from this process to a room's total and publish it.
-- Each user's like frames spend from a GCRA bucket (the gcra.lua prelude's arithmetic) shared
-- by all processes: a frame rate and a burst, with no window edge to double it; taps in the
-- frames over it are dropped. Loaded after the now_ms.lua and gcra.lua preludes.
-- KEYS[1]    like total
-- KEYS[2]    the room's pub/sub channel
-- KEYS[3]    this call's done marker: a retry of a call that ran answers what it answered
-- KEYS[4..]  per-user like buckets, one per user
-- ARGV[1]    publish command: SPUBLISH or PUBLISH
-- ARGV[2]    ms per like frame (1000 / frames per second)
-- ARGV[3]    burst: frames that may come at once
-- ARGV[4..]  for each user, in KEYS order: frames, taps
-- Returns {total, accepted}
local total_key, channel, done = KEYS[1], KEYS[2], KEYS[3]
local publish, interval, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()

local answered = redis.call('HMGET', done, 'total', 'accepted')
if answered[1] then
  return {tonumber(answered[1]), tonumber(answered[2])}
end

local accepted = 0
for i = 4, #KEYS do
  local frames = tonumber(ARGV[2 * (i - 4) + 4])
  local taps = tonumber(ARGV[2 * (i - 4) + 5])
  -- As many of the frames as the bucket holds (gcra() answers for one cost; this is its inverse).
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local allowed_frames = math.max(0, math.min(frames, math.floor((now + interval * burst - tat) / interval)))
  if allowed_frames > 0 then
    gcra_spend(KEYS[i], tat + interval * allowed_frames, now)
  end
  accepted = accepted + math.floor(taps * allowed_frames / frames)
end

if accepted == 0 then
  return {tonumber(redis.call('GET', total_key)) or 0, 0}
end
local total = redis.call('INCRBY', total_key, accepted)
redis.call(publish, channel, 'A{"type":"likes","total":' .. total .. ',"delta":' .. accepted .. '}')
redis.call('HSET', done, 'total', total, 'accepted', accepted)
redis.call('PEXPIRE', done, 20000)  -- outlives the client's retries (3 tries of a 5 s timeout)
return {total, accepted}

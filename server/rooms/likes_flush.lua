-- Add one tick's likes from this process to a room's total and publish it.
-- Each user may send at most ARGV[2] like frames per second across all processes;
-- taps in frames over that are dropped.
-- KEYS[1]    like total
-- KEYS[2]    the room's pub/sub channel
-- KEYS[3]    this call's done marker: a retry of a call that ran answers what it answered
-- KEYS[4..]  per-user frame counters for the current second, one per user
-- ARGV[1]    publish command: SPUBLISH or PUBLISH
-- ARGV[2]    max like frames per user per second
-- ARGV[3..]  for each user, in KEYS order: frames, taps
-- Returns {total, accepted}
local total_key, channel, done = KEYS[1], KEYS[2], KEYS[3]
local publish, max_frames = ARGV[1], tonumber(ARGV[2])

local answered = redis.call('HMGET', done, 'total', 'accepted')
if answered[1] then
  return {tonumber(answered[1]), tonumber(answered[2])}
end

local accepted = 0
for i = 4, #KEYS do
  local frames = tonumber(ARGV[2 * (i - 4) + 3])
  local taps = tonumber(ARGV[2 * (i - 4) + 4])
  local used = redis.call('INCRBY', KEYS[i], frames)
  if used == frames then
    redis.call('EXPIRE', KEYS[i], 2)
  end
  local allowed_frames = math.max(0, math.min(frames, max_frames - (used - frames)))
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

-- Delete a chat message from the history and tell the room.
-- KEYS[1]  history list
-- KEYS[2]  the room's pub/sub channel
-- ARGV[1]  the start of the message's JSON: {"type":"chat","id":"<id>"
-- ARGV[2]  the chat_deleted event, JSON
-- ARGV[3]  publish command: SPUBLISH or PUBLISH
-- Returns 1 if the message was in the history, else 0 (the event goes out either way:
-- older messages may still be on screens).
local history, channel = KEYS[1], KEYS[2]
local prefix, event, publish = ARGV[1], ARGV[2], ARGV[3]

local found = 0
for _, item in ipairs(redis.call('LRANGE', history, 0, -1)) do
  if string.sub(item, 1, #prefix) == prefix then
    redis.call('LREM', history, 1, item)
    found = 1
    break
  end
end
redis.call(publish, channel, 'A' .. event)
return found

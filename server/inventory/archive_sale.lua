-- Archive a settled sale: free what only served its selling (buyers, idempotency keys, orders,
-- due times, stream; SQL has its orders) and keep the hash (its figures, small) with the time it
-- was archived. A sale whose launch died between indexing it and creating it has no hash: it
-- gets one of `archived_at` alone, so that the launch can never create it afterwards.
-- KEYS[1]     sale hash
-- KEYS[2..n]  the sale's other keys
-- ARGV[1]     now (ms)
redis.call('DEL', unpack(KEYS, 2))
redis.call('HSET', KEYS[1], 'archived_at', ARGV[1])
return 1

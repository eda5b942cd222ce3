"""Real-time personalization: an event log, an online feature store and a recommendation service.

    events  the event schema of the data contract, validation, deduplication and the last-N
            distinct items per user: plain functions shared by the Redis consumer and Beam
    store   the online feature store (Redis, or embedded in-process) and the item title cache
    stream  the event log on Redis Streams: XADD on ingest, a consumer group that applies events
            to the store and acknowledges them in the same transaction
    service the HTTP service (POST /events, GET /recommend, GET /stats, GET /metrics)
    beam    the same transforms as Beam PTransforms, reading Kafka or Pub/Sub in production
"""

"""The real-time room layer: WebSocket connections, danmaku, likes, pins,
presence and moderation, fanned out across processes through Redis."""

"""kopf operator: reconciles LLMService → WorkerPools → Deployments, Services, ConfigMaps."""

//! pprof (profile.proto) types and codecs shared by the agent and the server.

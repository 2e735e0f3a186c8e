// How an EmbeddedProcessingWorker is set up: the Python worker's
// configuration, where status polls are served from, how long close may take.
using System;

namespace EmbeddedWorker
{
    public sealed class WorkerOptions
    {
        /// <summary>The Python WorkerConfig: an object, a dictionary, JSON text or a file path; null reads EMBEDDED_WORKER_CONFIG.</summary>
        public object Config;
        /// <summary>Serve typed status polls from the progress board while work runs (no GIL).</summary>
        public bool StatusFromBoard = true;
        public TimeSpan CloseTimeout = TimeSpan.FromSeconds(30);
        /// <summary>How often WaitFor*Async looks at the board.</summary>
        public TimeSpan WaitPollInterval = TimeSpan.FromMilliseconds(20);
    }
}

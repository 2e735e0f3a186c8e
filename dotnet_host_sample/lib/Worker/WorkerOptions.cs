// How an EmbeddedProcessingWorker is set up: the Python worker's
// configuration, how async calls are dispatched, where status polls are
// served from, how long close may take.
using System;

namespace EmbeddedWorker
{
    /// <summary>Where ExecuteAsync runs a call that does not block (see CallDispatch in the benchmark).</summary>
    public enum CallDispatch
    {
        /// <summary>On the caller's thread, returning a completed task: a status call is a few microseconds.</summary>
        Inline,
        /// <summary>On one dedicated thread that makes every Python call (calls queue there, not for the GIL).</summary>
        DedicatedThread,
        /// <summary>Task.Run for every call (what the sample did first).</summary>
        ThreadPool,
    }

    public sealed class WorkerOptions
    {
        /// <summary>The Python WorkerConfig: an object, a dictionary, JSON text or a file path; null reads EMBEDDED_WORKER_CONFIG.</summary>
        public object Config;
        public CallDispatch Dispatch = CallDispatch.Inline;
        /// <summary>Serve typed status polls from the progress board while work runs (no GIL).</summary>
        public bool StatusFromBoard = true;
        public TimeSpan CloseTimeout = TimeSpan.FromSeconds(30);
        /// <summary>How often WaitFor*Async looks at the board.</summary>
        public TimeSpan WaitPollInterval = TimeSpan.FromMilliseconds(20);
    }
}

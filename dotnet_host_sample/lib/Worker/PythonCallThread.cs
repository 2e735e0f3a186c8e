// One thread that makes Python calls for async callers (CallDispatch.DedicatedThread):
// callers queue here instead of for the GIL. Continuations run on the thread
// pool, never on this thread.
using System;
using System.Collections.Concurrent;
using System.Threading;
using System.Threading.Tasks;

namespace EmbeddedWorker
{
    internal sealed class PythonCallThread : IDisposable
    {
        readonly BlockingCollection<Action> queue = new BlockingCollection<Action>();
        readonly Thread thread;

        public PythonCallThread()
        {
            thread = new Thread(() => { foreach (var work in queue.GetConsumingEnumerable()) work(); })
            {
                IsBackground = true,
                Name = "python-calls",
            };
            thread.Start();
        }

        public Task<T> Run<T>(Func<T> call, CancellationToken token)
        {
            var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
            try
            {
                queue.Add(() =>
                {
                    if (token.IsCancellationRequested) { done.TrySetCanceled(token); return; }
                    try { done.TrySetResult(call()); }
                    catch (Exception error) { done.TrySetException(error); }
                });
            }
            catch (InvalidOperationException)
            {
                done.TrySetException(new WorkerException("unavailable", "the worker is closed"));
            }
            return done.Task;
        }

        public void Dispose()
        {
            queue.CompleteAdding();
            if (Thread.CurrentThread != thread) thread.Join();
        }
    }
}

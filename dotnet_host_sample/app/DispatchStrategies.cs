// The benchmark's other places for an async call to run: the library runs a
// call that takes microseconds on the caller's thread (a completed task: a
// thread hop costs more than the call) and only blocking requests on the
// thread pool. These two alternatives, measured against it in `make bench`,
// are the app's: a service that wants one wraps the worker the same way.
//   DedicatedThreadService  one thread makes every Python call; callers queue
//                           there instead of for the GIL
//   ThreadPoolService       Task.Run for every call (what the sample did first)
using System;
using System.Collections.Concurrent;
using System.Threading;
using System.Threading.Tasks;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public sealed class DedicatedThreadService : IPythonWorkerService, IDisposable
    {
        readonly EmbeddedProcessingWorker worker;
        readonly BlockingCollection<Action> queue = new BlockingCollection<Action>();
        readonly Thread thread;

        public DedicatedThreadService(EmbeddedProcessingWorker worker)
        {
            this.worker = worker;
            thread = new Thread(() => { foreach (var work in queue.GetConsumingEnumerable()) work(); })
            {
                IsBackground = true,
                Name = "python-calls",
            };
            thread.Start();
        }

        public Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request,
                                        CancellationToken cancellationToken = default(CancellationToken))
        {
            return Run(() => worker.Execute(command, request), cancellationToken);
        }

        public Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson,
                                             CancellationToken cancellationToken = default(CancellationToken))
        {
            return Run(() => worker.ExecuteJson(command, requestJson), cancellationToken);
        }

        Task<T> Run<T>(Func<T> call, CancellationToken token)
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
                done.TrySetException(new WorkerException("unavailable", "the call thread is stopped"));
            }
            return done.Task;
        }

        public void Dispose()
        {
            queue.CompleteAdding();
            if (Thread.CurrentThread != thread) thread.Join();
        }
    }

    public sealed class ThreadPoolService : IPythonWorkerService
    {
        readonly EmbeddedProcessingWorker worker;

        public ThreadPoolService(EmbeddedProcessingWorker worker)
        {
            this.worker = worker;
        }

        public Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request,
                                        CancellationToken cancellationToken = default(CancellationToken))
        {
            return Task.Run(() => worker.Execute(command, request), cancellationToken);
        }

        public Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson,
                                             CancellationToken cancellationToken = default(CancellationToken))
        {
            return Task.Run(() => worker.ExecuteJson(command, requestJson), cancellationToken);
        }
    }
}

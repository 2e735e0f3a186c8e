// Design notes
// - The lifetime a service's host drives: StartAsync when the service starts,
//   StopAsync when it stops (the IHostedService shape without its package;
//   lib/Hosting/ adapts it for an SDK build).
// - One thread of the service's own starts the interpreter and later shuts it
//   down: pythonnet's Initialize and Shutdown belong on one thread (the thread
//   state BeginAllowThreads saved is the one EndAllowThreads restores), and
//   the start (interpreter, venv, the worker's import) takes seconds the
//   caller's thread should not spend.
// - A token that fires during the start undoes what was started (the safe
//   shutdown) before StartAsync ends cancelled: nothing is left running. A
//   token already cancelled starts nothing, and a later StartAsync may start.
// - Stop is PythonRuntime.Dispose, the library's safe shutdown (README,
//   "Shutting down"): it closes the worker (registered through OnShutdown),
//   disposes handles, drains finalizers, shuts the interpreter down. StopAsync
//   waits for it at most StopTimeout, or until its token fires, then returns
//   and the shutdown goes on in the background (`Stopped` ends with it): a
//   Python thread cannot be cut short, so the bound is on the host's wait.
using System;
using System.Threading;
using System.Threading.Tasks;

namespace EmbeddedWorker
{
    public sealed class EmbeddedWorkerService : IDisposable
    {
        readonly object gate = new object();  // guards `lifetime` and the stop request against a racing start
        readonly string venvPath;
        readonly WorkerOptions options;
        readonly TaskCompletionSource<bool> ready = new TaskCompletionSource<bool>();
        readonly TaskCompletionSource<bool> stopped = new TaskCompletionSource<bool>();
        readonly ManualResetEventSlim stopRequested = new ManualResetEventSlim(false);
        Thread lifetime;
        volatile EmbeddedProcessingWorker worker;

        /// <summary>venvPath as PythonRuntime.Start reads it: null finds EMBEDDED_WORKER_VENV or a .venv above.</summary>
        public EmbeddedWorkerService(string venvPath = null, WorkerOptions options = null)
        {
            this.venvPath = venvPath;
            this.options = options ?? new WorkerOptions();
            StopTimeout = this.options.CloseTimeout;
        }

        /// <summary>How long StopAsync waits for the shutdown before it returns (the shutdown goes on).</summary>
        public TimeSpan StopTimeout { get; set; }

        /// <summary>The worker once StartAsync has completed; null before (and after a cancelled start).</summary>
        public EmbeddedProcessingWorker Worker { get { return worker; } }

        /// <summary>Completes when the shutdown has ended, whether or not StopAsync waited for it.</summary>
        public Task Stopped { get { return stopped.Task; } }

        /// <summary>Start the interpreter and the worker on the service's thread; completes when the worker is ready.</summary>
        public Task StartAsync(CancellationToken cancellationToken)
        {
            if (cancellationToken.IsCancellationRequested) return Task.FromCanceled(cancellationToken);
            lock (gate)
            {
                if (stopRequested.IsSet) return Task.FromException(new ObjectDisposedException("EmbeddedWorkerService"));
                if (lifetime == null)
                {
                    lifetime = new Thread(() => Live(cancellationToken)) { IsBackground = true, Name = "embedded worker lifetime" };
                    lifetime.Start();
                }
            }
            return ready.Task;
        }

        /// <summary>The safe shutdown, waited for at most StopTimeout or until the token fires; a second call waits for the first.</summary>
        public Task StopAsync(CancellationToken cancellationToken)
        {
            lock (gate)
            {
                stopRequested.Set();
                if (lifetime == null) stopped.TrySetResult(true);  // never started: nothing to shut down
            }
            return WaitBounded(cancellationToken);
        }

        /// <summary>StopAsync with no token: waits at most StopTimeout.</summary>
        public void Dispose()
        {
            StopAsync(CancellationToken.None).Wait();
        }

        async Task WaitBounded(CancellationToken cancellationToken)
        {
            var bound = Task.Delay(StopTimeout, cancellationToken);
            if (await Task.WhenAny(stopped.Task, bound).ConfigureAwait(false) == stopped.Task)
                await stopped.Task.ConfigureAwait(false);  // its failure, if it failed
        }

        void Live(CancellationToken cancellationToken)
        {
            PythonRuntime runtime = null;
            try
            {
                runtime = PythonRuntime.Start(venvPath);
                cancellationToken.ThrowIfCancellationRequested();
                worker = new EmbeddedProcessingWorker(runtime, options);
                cancellationToken.ThrowIfCancellationRequested();
            }
            catch (Exception error)
            {
                worker = null;
                if (runtime != null) ShutDown(runtime);
                else stopped.TrySetResult(true);
                if (error is OperationCanceledException) ready.TrySetCanceled();
                else ready.TrySetException(error);
                return;
            }
            ready.TrySetResult(true);
            stopRequested.Wait();
            ShutDown(runtime);
        }

        void ShutDown(PythonRuntime runtime)
        {
            try
            {
                runtime.Dispose();
                stopped.TrySetResult(true);
            }
            catch (Exception error)
            {
                stopped.TrySetException(error);
            }
        }
    }
}

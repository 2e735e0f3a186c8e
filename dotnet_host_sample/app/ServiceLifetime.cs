// `--service-lifetime`: EmbeddedWorkerService the way a service's host drives
// it, before anything else has started Python: a start whose token is already
// cancelled starts nothing; StartAsync returns at once and completes when the
// worker is ready; one session runs through the worker; StopAsync with a
// token that has fired returns while the shutdown goes on, and a second
// StopAsync waits for that shutdown to end. Prints what it measured, one line
// per failed check, and "service lifetime checks passed" when none failed.
// With `--cancel-during-start` (its own process: a cancelled start shuts
// Python down, and it does not start twice in one process) the token fires
// while the interpreter is starting: the start ends cancelled, no worker, the
// interpreter shut down again.
using System;
using System.Diagnostics;
using System.Globalization;
using System.Threading;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class ServiceLifetime
    {
        public static int CancelDuringStart(string venvPath)
        {
            var service = new EmbeddedWorkerService(venvPath);
            var source = new CancellationTokenSource();
            var starting = service.StartAsync(source.Token);
            source.Cancel();  // the interpreter's start takes seconds: this lands inside it
            try { starting.Wait(); } catch (AggregateException) { }
            bool held = starting.IsCanceled && service.Worker == null && service.Stopped.IsCompleted
                        && !Python.Runtime.PythonEngine.IsInitialized;
            Console.WriteLine("cancel during start: " + starting.Status + ", worker " + (service.Worker == null ? "none" : "made")
                              + ", shut down " + service.Stopped.IsCompleted + ", interpreter initialized "
                              + Python.Runtime.PythonEngine.IsInitialized);
            Console.WriteLine(held ? "service lifetime checks passed" : "CHECK FAILED: a start cancelled midway left something running");
            return held ? 0 : 1;
        }

        public static int Run(string venvPath)
        {
            int failed = 0;
            Action<bool, string> check = (ok, what) => { if (!ok) { failed++; Console.WriteLine("CHECK FAILED: " + what); } };
            var service = new EmbeddedWorkerService(venvPath, new WorkerOptions { CloseTimeout = TimeSpan.FromSeconds(10) })
            {
                StopTimeout = TimeSpan.FromMinutes(2),
            };

            // 1. a start whose token has fired: a cancelled task, no worker, nothing started
            var fired = new CancellationTokenSource();
            fired.Cancel();
            var refused = service.StartAsync(fired.Token);
            check(refused.IsCanceled, "a start with a fired token is cancelled (" + refused.Status + ")");
            check(service.Worker == null, "a cancelled start leaves no worker");
            Console.WriteLine("cancelled start: " + refused.Status + ", worker " + (service.Worker == null ? "none" : "made"));

            // 2. a start off the caller's thread, complete when the worker is ready
            var clock = Stopwatch.StartNew();
            var starting = service.StartAsync(CancellationToken.None);
            double returnedMs = clock.Elapsed.TotalMilliseconds;
            check(!starting.IsCompleted, "StartAsync returns before the interpreter is up");
            starting.Wait();
            double startMs = clock.Elapsed.TotalMilliseconds;
            check(service.Worker != null, "the worker is there once StartAsync completes");

            // 3. one session through the worker, to the end
            var worker = service.Worker;
            var session = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic",
                                                       parameters = new { steps = 4, seed = 1 }, background = true });
            check(session.Success, "session started: " + session.Error);
            var final = worker.WaitForSessionAsync(session.Text("session_id")).Result;
            check(final.Status == "completed", "session completed (" + final.Status + ")");
            var running = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic",
                                                       parameters = new { steps = 150, seed = 2 }, background = true });
            check(running.Success, "a second session left running for the stop: " + running.Error);

            // 4. a stop whose token has fired returns (the host moves on); a second stop waits for the shutdown
            clock.Restart();
            service.StopAsync(fired.Token).Wait();
            double firstStopMs = clock.Elapsed.TotalMilliseconds;
            bool endedBeforeReturn = service.Stopped.IsCompleted;
            service.StopAsync(CancellationToken.None).Wait();
            double stopMs = clock.Elapsed.TotalMilliseconds;
            check(service.Stopped.IsCompleted && !service.Stopped.IsFaulted, "the second stop waited for the shutdown to end");
            var after = worker.GetStatus();
            check(!after.Success && after.ErrorCode == "unavailable", "after the stop the worker answers unavailable");

            Console.WriteLine(string.Format(CultureInfo.InvariantCulture,
                "service lifetime: start_returned_ms={0:F1} start_ms={1:F1} session={2} stop_with_fired_token_returned_ms={3:F1} " +
                "shutdown_ended_before_that_return={4} stop_ms={5:F1} after_stop={6}",
                returnedMs, startMs, final.Status, firstStopMs, endedBeforeReturn, stopMs, after.ErrorCode));
            if (failed == 0) Console.WriteLine("service lifetime checks passed");
            return failed == 0 ? 0 : 1;
        }
    }
}

// The host's side of `make bench`: the in-process worker from C#, and the
// out-of-process JSON-lines worker ServiceProcessing used before, measured in
// the same run on the same machine. Results go to a JSON file that the
// Python benchmark runner folds into its tables; it runs this once per .NET
// runtime (Mono, CoreCLR) and sets them side by side. Cold start is the
// process's start to a worker that takes requests; the model's load is
// timed apart; Program prints the shutdown's time after the file is written.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class HostBenchmarks
    {
        const string Prompt = "a lighthouse on a cliff at sunset";
        static readonly TimeSpan WarmUp = TimeSpan.FromSeconds(1);

        public static int Run(PythonRuntime runtime, string resultPath)
        {
            var made = Stopwatch.StartNew();
            var worker = new EmbeddedProcessingWorker(runtime);
            double workerMs = made.Elapsed.TotalMilliseconds;
            var model = Environment.GetEnvironmentVariable("EMBEDDED_WORKER_BENCH_MODEL") ?? "builtin:tiny-sd";
            var loading = Stopwatch.StartNew();
            var modelLoad = worker.Execute("model.load_model", new { model_id = model });
            if (!modelLoad.Success) throw new InvalidOperationException("model load failed: " + modelLoad);
            var coldStart = new Dictionary<string, object>
            {
                { "runtime", DotNetRuntime.Name }, { "runtime_version", DotNetRuntime.Description },
                { "runtime_start_ms", Program.RuntimeStartMs }, { "python_start_ms", Program.PythonStartMs },
                { "worker_ms", workerMs }, { "cold_start_ms", Program.RuntimeStartMs + Program.PythonStartMs + workerMs },
                { "model", model }, { "model_load_ms", loading.Elapsed.TotalMilliseconds },
            };
            var rows = new List<object>();
            var handoff = new List<object>();
            var probe = worker.ExecuteWorkflow(new { session_id = "probe", workflow_id = "img-generation-basic",
                                                     parameters = new { steps = 4, seed = 1 }, background = false });
            if (probe.Text("status") != "completed") throw new InvalidOperationException("probe failed: " + probe);
            int slot = (int)probe.Number("board_slot");
            var statusJson = "{\"session_id\": \"probe\", \"action\": \"get_status\"}";
            Dictionary<string, object> pollingUnderLoad = null;

            var service = new ServiceProcessing(worker);
            using (var board = worker.OpenBoard())
            {
                foreach (var loaded in new[] { false, true })
                {
                    string condition = loaded ? "while a batch runs" : "idle";
                    string batchId = loaded ? StartLoad(worker) : null;
                    rows.Add(Row("ServiceProcessing shape (ExecuteAsync + dynamic)", condition, Time(20000, () => Shape(service))));
                    if (!loaded)
                    {
                        using (var dedicated = new DedicatedThreadService(worker))
                        {
                            var throughThread = new ServiceProcessing(dedicated);
                            rows.Add(Row("ServiceProcessing shape, DedicatedThread dispatch", condition,
                                         Time(10000, () => Shape(throughThread))));
                        }
                        var throughPool = new ServiceProcessing(new ThreadPoolService(worker));
                        rows.Add(Row("ServiceProcessing shape, ThreadPool dispatch", condition,
                                     Time(10000, () => Shape(throughPool))));
                    }
                    rows.Add(Row("typed GetSessionStatus", condition, Time(20000, () => worker.GetSessionStatus("probe"))));
                    worker.Options.StatusFromBoard = false;
                    rows.Add(Row("typed GetSessionStatus, board off (Python)", condition,
                                 Time(20000, () => worker.GetSessionStatus("probe"))));
                    worker.Options.StatusFromBoard = true;
                    rows.Add(Row("Execute (dynamic Reply)", condition,
                                 Time(10000, () => worker.Execute("get_session_status", new { session_id = "probe" }))));
                    rows.Add(Row("ExecuteJson (JSON string)", condition,
                                 Time(10000, () => worker.ExecuteJson("get_session_status", statusJson))));
                    rows.Add(BoardRow(board, slot, condition));
                    if (loaded)
                    {
                        worker.Options.StatusFromBoard = false;
                        rows.Add(Row("typed GetSessionStatus, 4 threads, board off (Python)", condition, Threads(4, 5000,
                            () => worker.GetSessionStatus("probe"))));
                        worker.Options.StatusFromBoard = true;
                        pollingUnderLoad = PollersAgainstThroughput(worker, batchId, 16);
                        rows.AddRange((List<object>)pollingUnderLoad["rows"]);
                        var busy = worker.GetBatchStatus(batchId);
                        if (busy.Status != "running")
                            Console.Error.WriteLine("warning: the load batch was " + busy.Status + " at the end");
                        worker.DeleteBatch(batchId);
                    }
                }
            }

            var outputs = MakeLargeResult(worker);
            handoff.Add(Handoff(worker, outputs, "8 x 512x512x3 (6 MiB)"));
            handoff.Add(Handoff(worker, new List<object>(probe.List("outputs")), "1 x 32x32x3 (3 KiB)"));

            var outOfProcess = new List<object>();
            using (var remote = new JsonLinesWorker(runtime.PythonExecutable, runtime.RepoRoot))
            {
                var remoteProbe = remote.Call("execute_workflow", "{\"session_id\": \"probe\", \"workflow_id\": " +
                    "\"img-generation-basic\", \"parameters\": {\"steps\": 4, \"seed\": 1}, \"background\": false}");
                if (!remoteProbe.Contains("\"completed\"")) throw new InvalidOperationException("remote probe failed");
                outOfProcess.Add(Row("JSON-lines get_session_status", "idle",
                                     Time(3000, () => remote.Call("get_session_status", statusJson))));
                var remoteOutputs = remote.Call("execute_workflow", LargeResultJson());
                var ids = Extract(remoteOutputs, "\"output_id\": \"");
                outOfProcess.Add(RemoteHandoff(remote, ids, "8 x 512x512x3 (6 MiB) as base64 JSON"));
            }

            var result = new Dictionary<string, object>
            {
                { "status_and_board", rows }, { "output_handoff", handoff }, { "out_of_process", outOfProcess },
                { "pollers_and_throughput", pollingUnderLoad["throughput"] }, { "cold_start", coldStart },
            };
            File.WriteAllText(resultPath, new Reply(result).ToString());
            Console.WriteLine("host benchmark written to " + resultPath);
            return 0;
        }

        /// <summary>A status poll as ServiceProcessing reads it.</summary>
        static string Shape(ServiceProcessing service)
        {
            dynamic reply = service.GetSessionStatusAsync("probe").Result;
            return (string)reply.status;
        }

        static string StartLoad(EmbeddedProcessingWorker worker)
        {
            var batch = worker.ExecuteBatch(new { workflow_id = "img-generation-basic",
                parameters = new { prompt = Prompt, steps = 40, seed = 0, total_images = 400 } });
            string id = batch.Text("batch_id");
            while (worker.GetBatchStatus(id).Status != "running") Thread.Sleep(10);
            return id;
        }

        /// <summary>
        /// The batch's images/s over alternating windows without and with `threads` C# threads polling its
        /// typed status (served from the board), in one run; and the pollers' latency. Pollers poll every
        /// millisecond (16 threads: 16,000 polls/s, far more than a service asks); one last window has them
        /// spinning with no pause, which on a 2-core machine takes the cores from the batch itself.
        /// </summary>
        static Dictionary<string, object> PollersAgainstThroughput(EmbeddedProcessingWorker worker, string batchId, int threads)
        {
            var window = TimeSpan.FromSeconds(10);
            var quiet = new List<double>();
            var polled = new List<double>();
            var samples = new List<double>();
            var spinSamples = new List<double>();
            for (int round = 0; round < 2; round++)
            {
                quiet.Add(Rate(worker, batchId, window, 0, 1, samples));
                polled.Add(Rate(worker, batchId, window, threads, 1, samples));
            }
            quiet.Add(Rate(worker, batchId, window, 0, 1, samples));
            double spinning = Rate(worker, batchId, window, threads, 0, spinSamples);
            var row = Row("typed GetBatchStatus, " + threads + " threads (board), 1 ms apart", "while a batch runs", samples);
            var spinRow = Row("typed GetBatchStatus, " + threads + " threads (board), spinning", "while a batch runs", spinSamples);
            var throughput = new Dictionary<string, object>
            {
                { "threads", (long)threads }, { "window_s", window.TotalSeconds }, { "poll_interval_ms", 1L },
                { "img_s_without_pollers", quiet }, { "img_s_with_pollers", polled },
                { "img_s_with_spinning_pollers", new List<double> { spinning } },
                { "polls", (long)samples.Count }, { "spinning_polls", (long)spinSamples.Count },
            };
            return new Dictionary<string, object> { { "rows", new List<object> { row, spinRow } }, { "throughput", throughput } };
        }

        /// <summary>
        /// Images/s over `window`, counted from the board's progress (fractions of images included: a cohort
        /// of 8 at 40 steps can take longer than a window on a busy machine, so whole images would read 0).
        /// </summary>
        static double Rate(EmbeddedProcessingWorker worker, string batchId, TimeSpan window, int threads, int pauseMs,
                           List<double> samples)
        {
            var stop = false;
            var pollers = new List<Thread>();
            for (int t = 0; t < threads; t++)
            {
                var thread = new Thread(() =>
                {
                    var mine = new List<double>();
                    var watch = new Stopwatch();
                    while (!Volatile.Read(ref stop))
                    {
                        watch.Restart();
                        var status = worker.GetBatchStatus(batchId);
                        mine.Add(watch.Elapsed.TotalMilliseconds * 1000);
                        if (!status.Success) throw new InvalidOperationException("poll failed: " + status.Error);
                        if (pauseMs > 0) Thread.Sleep(pauseMs);
                    }
                    lock (samples) samples.AddRange(mine);
                });
                pollers.Add(thread);
                thread.Start();
            }
            double before = ImagesDone(worker, batchId);
            var clock = Stopwatch.StartNew();
            Thread.Sleep(window);
            double after = ImagesDone(worker, batchId);
            double seconds = clock.Elapsed.TotalSeconds;
            Volatile.Write(ref stop, true);
            foreach (var thread in pollers) thread.Join();
            return (after - before) / seconds;
        }

        static double ImagesDone(EmbeddedProcessingWorker worker, string batchId)
        {
            WorkProgress progress;
            if (!worker.TryGetProgress(batchId, out progress))
                throw new InvalidOperationException("the load batch is not on the board");
            return progress.Percent / 100.0 * progress.ItemsTotal;
        }

        static object[] LargeResultDomains()
        {
            return new object[]
            {
                new { domain = "inference", operation = "text2img", parameters = new { prompt = Prompt, steps = 4, seed = 3, num_images = 8 } },
                new { domain = "postprocessing", operation = "resize", parameters = new { width = 512, height = 512 } },
            };
        }

        static string LargeResultJson()
        {
            return "{\"background\": false, \"domains\": [" +
                   "{\"domain\": \"inference\", \"operation\": \"text2img\", \"parameters\": {\"prompt\": \"" + Prompt + "\", \"steps\": 4, \"seed\": 3, \"num_images\": 8}}," +
                   "{\"domain\": \"postprocessing\", \"operation\": \"resize\", \"parameters\": {\"width\": 512, \"height\": 512}}]}";
        }

        static List<object> MakeLargeResult(EmbeddedProcessingWorker worker)
        {
            var reply = worker.ExecuteWorkflow(new { domains = LargeResultDomains(), background = false });
            if (reply.Text("status") != "completed") throw new InvalidOperationException("large result failed: " + reply);
            return new List<object>(reply.List("outputs"));
        }

        static Dictionary<string, object> Handoff(EmbeddedProcessingWorker worker, List<object> outputs, string what)
        {
            long checksum = 0;
            var row = Stats(Time(300, () =>
            {
                foreach (Reply output in outputs)
                {
                    Reply error;
                    using (var view = worker.GetOutput(output.Text("output_id"), out error))
                        checksum += view[view.Height - 1, view.Width - 1, 2];  // touch the far end of the memory
                }
            }));
            row["what"] = what;
            row["path"] = "in-process buffer";
            row["checksum"] = checksum;
            return row;
        }

        static Dictionary<string, object> RemoteHandoff(JsonLinesWorker remote, List<string> ids, string what)
        {
            long bytes = 0;
            var row = Stats(Time(8, () =>
            {
                foreach (var id in ids)
                {
                    var reply = remote.Call("get_output", "{\"output_id\": \"" + id + "\"}");
                    bytes = Convert.FromBase64String(Extract(reply, "\"pixels\": \"")[0]).LongLength;
                }
            }));
            row["what"] = what;
            row["path"] = "out of process, JSON lines";
            row["bytes_per_image"] = bytes;
            return row;
        }

        static Dictionary<string, object> BoardRow(ProgressBoard board, int slot, string condition)
        {
            const int reads = 2000000;
            BoardRow row;
            var watch = Stopwatch.StartNew();
            for (int i = 0; i < reads; i++) board.TryRead(slot, out row);
            double nanoseconds = watch.Elapsed.TotalMilliseconds * 1e6 / reads;
            return new Dictionary<string, object>
            {
                { "call", "board TryRead (no GIL)" }, { "condition", condition }, { "n", (long)reads },
                { "p50_us", nanoseconds / 1000.0 }, { "p99_us", null }, { "max_us", null },
            };
        }

        static Dictionary<string, object> Row(string call, string condition, List<double> samples)
        {
            var row = Stats(samples);
            row["call"] = call;
            row["condition"] = condition;
            return row;
        }

        /// <summary>
        /// `count` timed calls after a warm-up of at least 200 calls and a second, so both runtimes are timed in
        /// the steady state a service runs in: CoreCLR first compiles a method unoptimized and recompiles it once
        /// it is hot, in the background, and a poll ran 2-5 us slower over its first 0.3-0.4 s (the whole of a
        /// 20,000-call row timed at once).
        /// </summary>
        static List<double> Time(int count, Action action)
        {
            var warming = Stopwatch.StartNew();
            for (int i = 0; i < Math.Min(200, count) || warming.Elapsed < WarmUp; i++) action();
            var samples = new List<double>(count);
            var watch = new Stopwatch();
            for (int i = 0; i < count; i++)
            {
                watch.Restart();
                action();
                samples.Add(watch.Elapsed.TotalMilliseconds * 1000);
            }
            return samples;
        }

        static List<double> Threads(int threads, int perThread, Action action)
        {
            var all = new List<double>();
            var workers = new Thread[threads];
            for (int t = 0; t < threads; t++)
            {
                workers[t] = new Thread(() =>
                {
                    var mine = Time(perThread, action);
                    lock (all) all.AddRange(mine);
                });
                workers[t].Start();
            }
            foreach (var thread in workers) thread.Join();
            return all;
        }

        static Dictionary<string, object> Stats(List<double> microseconds)
        {
            microseconds.Sort();
            Func<double, double> at = q => microseconds[Math.Min(microseconds.Count - 1, (int)(q * microseconds.Count))];
            return new Dictionary<string, object>
            {
                { "n", (long)microseconds.Count }, { "p50_us", at(0.5) }, { "p99_us", at(0.99) },
                { "max_us", microseconds[microseconds.Count - 1] },
            };
        }

        static List<string> Extract(string json, string marker)
        {
            var found = new List<string>();
            for (int at = json.IndexOf(marker); at >= 0; at = json.IndexOf(marker, at + 1))
            {
                int start = at + marker.Length;
                found.Add(json.Substring(start, json.IndexOf('"', start) - start));
            }
            return found;
        }

        /// <summary>The previous architecture: a Python process behind stdin/stdout, one JSON line each way.</summary>
        sealed class JsonLinesWorker : IDisposable
        {
            readonly Process process;
            long next;

            public JsonLinesWorker(string python, string repoRoot)
            {
                var start = new ProcessStartInfo(python, "-u -m benchmarks.jsonl_worker")
                {
                    RedirectStandardInput = true,
                    RedirectStandardOutput = true,
                    UseShellExecute = false,
                    WorkingDirectory = repoRoot,
                };
                process = Process.Start(start);
                process.StandardInput.AutoFlush = true;
                var ready = process.StandardOutput.ReadLine();
                if (ready == null || !ready.Contains("ready")) throw new InvalidOperationException("JSON-lines worker did not start");
            }

            public string Call(string command, string requestJson)
            {
                var line = new StringBuilder();
                line.Append("{\"id\": ").Append(next++).Append(", \"command\": \"").Append(command)
                    .Append("\", \"request\": ").Append(requestJson).Append('}');
                process.StandardInput.WriteLine(line.ToString());
                return process.StandardOutput.ReadLine();
            }

            public void Dispose()
            {
                process.StandardInput.Close();
                if (!process.WaitForExit(30000)) process.Kill();
                process.Dispose();
            }
        }
    }
}

// Design notes
// - The worker lives in this process: a call is a GIL acquire, one Python
//   call and one pass over the reply, a few microseconds. Requests and
//   replies cross through the C API (RequestWriter, ReplyReader): per-type
//   accessors cached, the reply read in one pass into plain C# values, no
//   PyObject made or handed out. Where the C API path is unavailable the
//   pythonnet path (PyConvert) does the same, slower.
// - ExecuteAsync completes synchronously for calls that take microseconds
//   (a completed task: a thread hop costs more than the call) and moves only
//   blocking calls (`background: false`) to the thread pool. The other
//   strategies the benchmark compares are the app's (DispatchStrategies.cs).
// - Typed status polls are served from the progress board while the work
//   runs: no GIL, no call, however many threads poll. Python is asked only
//   for what the board does not hold (when it ended, why it failed, work the
//   board does not list), and a final answer is kept until its board row
//   changes (a restart): BoardStatusCache.cs.
// - How Python is called, and how its failures become envelopes (with the
//   Python traceback where it raised), is PythonWorkerCalls.cs. After close,
//   calls answer `unavailable`.
// - Never hold the GIL across an await (pythonnet #1454): every call here is
//   synchronous and short.
#pragma warning disable 612  // PyObject.Handle: read only while the object is alive, as the C API path needs
using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using Python.Runtime;

namespace EmbeddedWorker
{
    public sealed partial class EmbeddedProcessingWorker : IPythonWorkerService, IDisposable
    {
        readonly PythonRuntime runtime;
        readonly WorkerOptions options;
        readonly PythonWorkerCalls calls;  // the Python worker and how it is called
        readonly BoardStatusCache statuses;  // where the board lists work, and final answers kept
        IntPtr execute, sessionStatus, batchStatus;  // borrowed from the bound methods, valid until closed

        public EmbeddedProcessingWorker(PythonRuntime runtime, object config = null)
            : this(runtime, new WorkerOptions { Config = config })
        {
        }

        public EmbeddedProcessingWorker(PythonRuntime runtime, WorkerOptions options)
        {
            this.runtime = runtime;
            this.options = options ?? new WorkerOptions();
            using (Gil.Hold())
            using (var module = Py.Import("embedded_worker"))
            using (var type = module.GetAttr("ProcessingWorker"))
            using (var settings = PyConvert.ToPython(this.options.Config))
            {
                var worker = type.Invoke(settings);
                using (var layout = worker.InvokeMethod("board_layout"))
                using (var array = worker.InvokeMethod("progress_board"))
                    statuses = new BoardStatusCache(ProgressBoard.Open(array, PyConvert.ToReply(layout)));
                calls = new PythonWorkerCalls(runtime, worker, statuses.Learn);
                execute = calls.Method("execute").Handle;
                sessionStatus = calls.Method("get_session_status").Handle;
                batchStatus = calls.Method("get_batch_status").Handle;
            }
            runtime.OnShutdown(() => Close(this.options.CloseTimeout));
        }

        public WorkerOptions Options { get { return options; } }
        internal PythonRuntime Runtime { get { return runtime; } }

        // ---- the ServiceProcessing shape -------------------------------------------------------

        public Task<Reply> ExecuteAsync(PythonWorkerType workerType, string command, object request,
                                        CancellationToken cancellationToken = default(CancellationToken))
        {
            var name = Qualified(workerType, command);
            return Dispatch(() => Execute(name, request), RequestShapes.Blocks(request), cancellationToken);
        }

        public Task<string> ExecuteJsonAsync(PythonWorkerType workerType, string command, string requestJson,
                                             CancellationToken cancellationToken = default(CancellationToken))
        {
            var name = Qualified(workerType, command);
            return Dispatch(() => ExecuteJson(name, requestJson), JsonRequestShape.Blocks(requestJson), cancellationToken);
        }

        Task<T> Dispatch<T>(Func<T> call, bool blocks, CancellationToken token)
        {
            if (token.IsCancellationRequested) return Task.FromCanceled<T>(token);
            if (blocks) return Task.Run(call, token);
            try
            {
                return Task.FromResult(call());  // microseconds: done before a hop would have started
            }
            catch (Exception error)
            {
                return Task.FromException<T>(error);
            }
        }

        // Command names go as the caller spells them: the facade reads any spelling (its `_snake`), so they are
        // not converted here too. Processing is the facade's default domain: its commands go bare and meet the
        // facade's table of direct calls (no name parsing there). Other domains are prefixed with the enum's
        // name, read once (Enum.ToString is reflection on Mono); the values run 0..n-1, as GetNames lists them.
        static readonly string[] DomainNames = Enum.GetNames(typeof(PythonWorkerType));

        static string Qualified(PythonWorkerType workerType, string command)
        {
            if (command == null || workerType == PythonWorkerType.Processing || command.Contains(".")) return command;
            int index = (int)workerType;
            return (index >= 0 && index < DomainNames.Length ? DomainNames[index] : workerType.ToString()) + "." + command;
        }

        public Reply Execute(string command, object request)
        {
            return calls.Invoke(execute, new object[] { command, request });
        }

        public string ExecuteJson(string command, string requestJson)
        {
            string text = null;
            Reply refused;
            if (!calls.Guarded(() =>
            {
                using (var name = new PyString(command ?? ""))
                using (var json = PyConvert.ToPython(requestJson))
                using (var reply = calls.Worker.InvokeMethod("execute", name, json))
                    text = reply.As<string>();
            }, out refused)) return refused.ToString();
            return text;
        }

        // ---- typed commands ----------------------------------------------------------------------

        public Reply GetWorkflows() { return calls.Call("get_workflows"); }
        public Reply GetWorkflow(string workflowId) { return calls.Call("get_workflow", new { workflow_id = workflowId }); }
        public Reply ExecuteWorkflow(object request) { return calls.Call("execute_workflow", request); }
        public Reply ControlSession(string sessionId, string action)
        {
            return calls.Call("control_session", new { session_id = sessionId, action = action });
        }
        public Reply DeleteSession(string sessionId, bool forceCleanup = true)
        {
            return calls.Call("delete_session", new { session_id = sessionId, force_cleanup = forceCleanup });
        }
        public Reply ExecuteBatch(object request) { return calls.Call("execute_batch", request); }
        public Reply ControlBatch(string batchId, string action)
        {
            return calls.Call("control_batch", new { batch_id = batchId, action = action });
        }
        public Reply GetBatch(string batchId, bool includeItems = false)
        {
            return calls.Call("get_batch_status", new { batch_id = batchId, include_items = includeItems });
        }
        public Reply DeleteBatch(string batchId, bool forceCleanup = true)
        {
            return calls.Call("delete_batch", new { batch_id = batchId, force_cleanup = forceCleanup });
        }
        public Reply GetStatus() { return calls.Call("get_status"); }

        /// <summary>Status, progress and step: from the board while it runs, from Python for the rest.</summary>
        public SessionStatus GetSessionStatus(string sessionId)
        {
            return ReadStatus(sessionId, BoardStatusCache.SessionKind, sessionStatus, () => new SessionStatus(), (status, row) =>
            {
                status.Progress = (int)(row.ProgressBp / 100);
                status.CurrentStep = (int)row.CurrentStep;
            }, (status, reply) =>
            {
                status.Progress = (int)reply.Number("progress");
                status.CurrentStep = (int)reply.Number("current_step");
            });
        }

        /// <summary>Status and item counts: from the board while it runs, from Python for the rest.</summary>
        public BatchStatus GetBatchStatus(string batchId)
        {
            return ReadStatus(batchId, BoardStatusCache.BatchKind, batchStatus, () => new BatchStatus(), (status, row) =>
            {
                status.ProcessedItems = (int)row.ItemsDone;
                status.FailedItems = (int)row.ItemsFailed;
                status.TotalItems = (int)row.ItemsTotal;
            }, (status, reply) =>
            {
                status.ProcessedItems = (int)reply.Number("processed_items");
                status.FailedItems = (int)reply.Number("failed_items");
                status.TotalItems = (int)reply.Number("total_items");
            });
        }

        T ReadStatus<T>(string id, long kind, IntPtr method, Func<T> make, Action<T, BoardRow> fromBoard,
                        Action<T, Reply> fromReply) where T : StatusReading
        {
            BoardRow row = default(BoardRow);
            bool onBoard = options.StatusFromBoard && statuses.TryRead(id, kind, out row);
            if (onBoard)
            {
                if (!WorkStatus.IsFinal(row.Status))
                {
                    var live = make();
                    live.Success = true;
                    live.Status = row.Status;
                    live.FromBoard = true;
                    fromBoard(live, row);
                    return live;
                }
                T kept;
                if (statuses.TryGetFinal(id, row, out kept)) return kept;
            }
            var status = make();
            if (calls.Closed)
            {
                status.ErrorCode = "unavailable";
                status.Error = "the worker is closed";
                return status;
            }
            var reply = calls.Invoke(method, new object[] { id });
            status.Success = reply.Success;
            status.Error = reply.Error;
            status.ErrorCode = reply.ErrorCode;
            if (!status.Success) return status;
            status.Status = reply.Text("status");
            status.CompletedAt = reply.Text("completed_at");
            fromReply(status, reply);
            if (onBoard && WorkStatus.IsFinal(status.Status)) statuses.KeepFinal(id, row, status);
            return status;
        }

        /// <summary>The board row of a session or batch this worker has seen a reply for.</summary>
        public bool TryGetProgress(string id, out WorkProgress progress)
        {
            BoardRow row;
            progress = default(WorkProgress);
            if (!statuses.TryRead(id, out row)) return false;
            progress = WorkProgress.From(id, row);
            return true;
        }

        // ---- pixels without copies ------------------------------------------------------------------

        /// <summary>The output's pixels in place; dispose the view to release them (PythonRuntime does at shutdown).</summary>
        public OutputView GetOutput(string outputId, out Reply error)
        {
            OutputView view = null;
            Reply failure = null;
            Reply refused;
            if (!calls.Guarded(() =>
            {
                using (var id = PyConvert.ToPython(outputId))
                using (var result = calls.Worker.InvokeMethod("get_output", id))
                {
                    if (PyDict.IsDictType(result)) failure = PyConvert.ToReply(result);
                    else view = OutputView.Open(result);
                }
            }, out refused)) failure = refused;
            error = failure;
            if (view != null) runtime.Track(view);
            return view;
        }

        /// <summary>A host-writable input image; fill it, then name its InputId as `init_image`.</summary>
        public InputBuffer AllocateInput(int height, int width, out Reply error)
        {
            InputBuffer input = null;
            Reply failure = null;
            Reply refused;
            if (!calls.Guarded(() =>
            {
                using (var h = PyConvert.ToPython(height))
                using (var w = PyConvert.ToPython(width))
                using (var reply = calls.Worker.InvokeMethod("allocate_input", h, w))
                using (var success = reply.GetItem("success"))
                {
                    if (!success.IsTrue())
                    {
                        failure = PyConvert.ToReply(reply);
                        return;
                    }
                    using (var id = reply.GetItem("input_id"))
                    using (var buffer = reply.GetItem("buffer"))
                        input = InputBuffer.Open(id.As<string>(), buffer);
                }
            }, out refused)) failure = refused;
            error = failure;
            if (input != null) runtime.Track(input);
            return input;
        }

        /// <summary>A reader of the progress board; reads need no GIL and no call.</summary>
        public ProgressBoard OpenBoard()
        {
            ProgressBoard opened;
            using (Gil.Hold())
            using (var layout = calls.Worker.InvokeMethod("board_layout"))
            using (var array = calls.Worker.InvokeMethod("progress_board"))
                opened = ProgressBoard.Open(array, PyConvert.ToReply(layout));
            runtime.Track(opened);
            return opened;
        }

        public Reply DrainLogs(int maxRecords)
        {
            return calls.Call("drain_logs", maxRecords);
        }

        // ---- lifetime -------------------------------------------------------------------------------

        /// <summary>Stop intake, cancel or suspend, join the worker's threads. Before PythonEngine.Shutdown.</summary>
        public Reply Close(TimeSpan timeout)
        {
            if (calls.Closed || runtime.IsShutDown) return Reply.Failure("unavailable", "the worker is closed");
            var reply = calls.Call("close", timeout.TotalSeconds);  // meanwhile Python answers callers `unavailable`
            calls.Close();
            execute = sessionStatus = batchStatus = IntPtr.Zero;
            statuses.Dispose();
            return reply;
        }

        public void Dispose()
        {
            Close(options.CloseTimeout);
        }
    }
}
